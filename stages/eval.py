"""eval: score the baseline and the adapter on the same held-out cases (val split + eval.jsonl).

    python -m stages.eval --params params.yaml --base data/base --model-dir data/train --val data/build_dataset/val.jsonl \
        --eval data/build_dataset/eval.jsonl --out data/eval --per-workflow-csv metrics/eval_by_workflow.csv

Both models get the same prompts (every message before the final answer), the same chat template (the adapter's
tokenizer), greedy decoding, batched with left padding. Every prediction goes to data/eval/predictions.jsonl, so
eval_results.json can be recomputed without a model: `--rescore` does exactly that from the predictions file
(to try other normalisation params, say). Metrics are in stages/metrics.py.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from schemas.training import AdapterManifest, EvalParams, EvalResults, Prediction
from stages import metrics as M
from stages.basemodel import pin_cpu_math
from stages.chat import parse_tools, reference_text
from stages.core import (content_id, load_params, read_jsonl, read_model, read_models, write_json, write_jsonl,
                         write_text)

MODELS = ("baseline", "adapter")


def log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def load_cases(val_path: str | None, eval_path: str, include_val: bool, max_examples: int | None) -> list[dict]:
    cases = []
    sources = ([("val", val_path)] if include_val and val_path else []) + [("eval", eval_path)]
    for split, path in sources:
        for row in read_jsonl(path):
            msgs = row["messages"]
            if not msgs or msgs[-1].get("role") != "assistant" or len(msgs) < 2:
                raise SystemExit(f"{path}: row {row.get('id')}: needs a prompt and a final assistant answer")
            prompt = [{k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id", "name")}
                      for m in msgs[:-1]]
            cases.append({
                "key": f"{split}:{row.get('eval_case_id') or row['id']}",
                "id": str(row["id"]),
                "split": split,
                "workflow": str(row.get("workflow") or "unknown"),
                "prompt": prompt,
                "tools": parse_tools(row.get("tools")),
                "prompt_digest": content_id({"messages": prompt, "tools": parse_tools(row.get("tools"))}),
                "reference": reference_text(msgs[-1]),
                "expected_behavior": list(row.get("expected_behavior") or []),
                "forbidden_behavior": list(row.get("forbidden_behavior") or []),
            })
    cases.sort(key=lambda c: c["key"])
    keys = [c["key"] for c in cases]
    if len(set(keys)) != len(keys):
        raise SystemExit("eval: duplicate case ids in the held-out files")
    return cases[:max_examples] if max_examples else cases


# ---- generation --------------------------------------------------------------------------------------------------


def load_models(model_dir: Path, base_dir: Path):
    """(PeftModel, tokenizer, model_info). The baseline is the same object with the adapter disabled; the base is
    the base stage's folder, checked against its model.json and against the base train used."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.basemodel import check_base

    info = read_model(model_dir / "model.json", AdapterManifest)
    cuda = torch.cuda.is_available()
    base = check_base(base_dir)
    if base.weights_digest != info.base_model.weights_digest:
        raise SystemExit(f"{base_dir.name}: base weights {base.weights_digest} are not the ones the adapter was "
                         f"trained on ({info.base_model.weights_digest}); rerun train")
    source = str(base_dir)
    kwargs: dict[str, Any] = {"local_files_only": True}
    kwargs.update(use_safetensors=True, trust_remote_code=False)
    if cuda:
        bf16 = torch.cuda.is_bf16_supported()
        kwargs["dtype"] = torch.bfloat16 if bf16 else torch.float16
        if info.quantization == "4bit":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": 0}
    else:
        kwargs["dtype"] = torch.float32
    base = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / info.adapter_dir))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = PeftModel.from_pretrained(base, str(model_dir / info.adapter_dir))
    model.eval()
    return model, tokenizer, info


def generate(model, tokenizer, prompts: Sequence[tuple[list[dict], list | None]], batch_size: int,
             max_new_tokens: int, max_prompt_tokens: int, desc: str) -> tuple[list[str], int]:
    """Greedy completions in input order for (messages, tools) prompts; returns (texts, prompts truncated to their
    last max_prompt_tokens)."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    encoded, truncated = [], 0
    for messages, tools in prompts:
        ids = list(tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])
        if len(ids) > max_prompt_tokens:
            ids, truncated = ids[-max_prompt_tokens:], truncated + 1
        encoded.append(ids)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                               pad_token_id=tokenizer.pad_token_id)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))  # similar lengths share a batch
    out: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for j, i in enumerate(batch):
            seq = encoded[i]
            ids[j, width - len(seq):] = torch.tensor(seq)
            att[j, width - len(seq):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=gen_cfg)
        for j, i in enumerate(batch):
            out[i] = tokenizer.decode(gen[j, width:], skip_special_tokens=True).strip()
    return out, truncated


# ---- scoring -----------------------------------------------------------------------------------------------------


def prediction_rows(cases: Sequence[dict], preds: dict[str, list[str]]) -> list[dict]:
    rows = []
    for i, c in enumerate(cases):
        for model in MODELS:
            rows.append({
                "key": c["key"], "id": c["id"], "split": c["split"], "workflow": c["workflow"], "model": model,
                "prompt_digest": c["prompt_digest"], "prediction": preds[model][i], "reference": c["reference"],
                "expected_behavior": c["expected_behavior"], "forbidden_behavior": c["forbidden_behavior"],
            })
    return rows


def score_predictions(rows: Sequence[dict], params: EvalParams) -> tuple[dict, dict[str, dict]]:
    """(overall comparison, per-workflow comparisons) from prediction rows alone (pure: no model needed)."""
    norm = M.Normalizer(params.lowercase, params.collapse_whitespace, params.strip_punctuation)
    stop = params.stopwords if params.stopwords is not None else M.STOPWORDS
    by_case: dict[str, dict] = {}
    for r in rows:
        case = by_case.setdefault(r["key"], {"workflow": r["workflow"]})
        case[r["model"]] = M.score_case(r["prediction"], r["reference"], norm, stop,
                                        r.get("expected_behavior"), r.get("forbidden_behavior"))
    incomplete = [k for k, c in by_case.items() if not all(m in c for m in MODELS)]
    if incomplete:
        raise SystemExit(f"predictions lack a baseline or adapter row for {len(incomplete)} cases, e.g. {incomplete[0]}")
    cases = [by_case[k] for k in sorted(by_case)]
    overall = M.compare(cases, params.bootstrap_samples, params.confidence, params.seed)
    per_wf = {}
    for wf in sorted({c["workflow"] for c in cases}):
        per_wf[wf] = M.compare([c for c in cases if c["workflow"] == wf], params.bootstrap_samples,
                               params.confidence, params.seed)
    return overall, per_wf


def build_results(rows: Sequence[dict], params: EvalParams, info: AdapterManifest, truncated: int) -> EvalResults:
    overall, per_wf = score_predictions(rows, params)
    return EvalResults(
        n=overall["n"], baseline=overall["baseline"], finetuned=overall["finetuned"], delta=overall["delta"],
        counts=overall["counts"], ci=overall["ci"], mcnemar_exact_match=overall["mcnemar_exact_match"],
        per_workflow=per_wf, base_model=info.base_model, adapter_digest=info.adapter_digest,
        dataset_digest=info.dataset_digest, predictions_digest=content_id(list(rows)),
        truncated_prompts=truncated, params=params,
    )


def workflow_csv(results: EvalResults) -> str:
    """Long format, one row per (workflow, model): `dvc plots` draws it as a horizontal bar chart by label."""
    buf = io.StringIO()
    cols = ["exact_match", "keyword_recall", "token_f1"]
    buf.write("label,workflow,model,n," + ",".join(cols) + "\n")
    groups = [("ALL", results.n, results.baseline, results.finetuned)] + [
        (wf, c.n, c.baseline, c.finetuned) for wf, c in sorted(results.per_workflow.items())]
    for wf, n, base, tuned in groups:
        for model, scores in (("baseline", base), ("adapter", tuned)):
            vals = [getattr(scores, col) for col in cols]
            buf.write(f"{wf} / {model},{wf},{model},{n}," + ",".join("" if v is None else f"{v}" for v in vals) + "\n")
    return buf.getvalue()


def predict(params: EvalParams, base_dir: Path, model_dir: Path, val_path: str, eval_path: str) -> tuple[list[dict], int]:
    """Both models' greedy answers to every held-out case: (prediction rows, prompts truncated)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pin_cpu_math()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(params.seed)
    if params.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(params.cpu_threads)
    cases = load_cases(val_path, eval_path, params.include_val, params.max_examples)
    if not cases:
        raise SystemExit("eval: no held-out cases")
    model, tokenizer, _ = load_models(model_dir, base_dir)
    prompts = [(c["prompt"], c["tools"]) for c in cases]
    preds = {}
    with model.disable_adapter():
        preds["baseline"], truncated = generate(model, tokenizer, prompts, params.batch_size,
                                                params.max_new_tokens, params.max_prompt_tokens, "baseline")
    preds["adapter"], _ = generate(model, tokenizer, prompts, params.batch_size, params.max_new_tokens,
                                   params.max_prompt_tokens, "adapter")
    return prediction_rows(cases, preds), truncated


def stored_predictions(out: Path) -> tuple[list[dict], int]:
    """--rescore: the prediction rows of an earlier run, and its truncated-prompt count."""
    rows = [r.model_dump(mode="json") for r in read_models(out / "predictions.jsonl", Prediction)]
    prev = out / "eval_results.json"
    return rows, read_model(prev, EvalResults).truncated_prompts if prev.exists() else 0


def run(params: EvalParams, base_dir: Path, model_dir: Path, val_path: str, eval_path: str, out: Path,
        csv_path: str, rescore: bool = False) -> EvalResults:
    """The stage: predict (or reuse the stored predictions), score, write results and the per-workflow CSV."""
    info = read_model(model_dir / "model.json", AdapterManifest)
    if rescore:
        rows, truncated = stored_predictions(out)
    else:
        rows, truncated = predict(params, base_dir, model_dir, val_path, eval_path)
        write_jsonl(out / "predictions.jsonl", (Prediction.model_validate(r).model_dump(mode="json") for r in rows))
    results = build_results(rows, params, info, truncated)
    write_json(out / "eval_results.json", results.model_dump(mode="json", by_alias=True))
    write_text(csv_path, workflow_csv(results))
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.eval", description=__doc__.split("\n")[0])
    for name in ("params", "val", "eval", "per-workflow-csv"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--base", required=True, help="the base stage's folder (model.json, safetensors, tokenizer)")
    ap.add_argument("--model-dir", required=True, help="train's output folder (model.json, adapter/)")
    ap.add_argument("--out", required=True, help="folder for predictions.jsonl and eval_results.json")
    ap.add_argument("--rescore", action="store_true", help="recompute results from --out/predictions.jsonl, no model")
    a = ap.parse_args(argv)
    params = load_params(a.params, "eval", EvalParams)
    r = run(params, Path(a.base), Path(a.model_dir), a.val, a.eval, Path(a.out), a.per_workflow_csv, a.rescore)
    ci = r.ci.get("exact_match")
    print(f"eval: {r.n} held-out cases, exact match baseline {r.baseline.exact_match:.3f} -> adapter "
          f"{r.finetuned.exact_match:.3f} (delta {r.delta['exact_match']:+.3f}, {params.confidence:.0%} CI "
          f"[{ci.low:+.3f}, {ci.high:+.3f}], McNemar p={r.mcnemar_exact_match.p_value:.2g}) -> {a.out}")


if __name__ == "__main__":
    main()
