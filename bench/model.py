"""Model-half figures for bench/results.json: train tokens/s on the embedded base, batched eval generation
against one prompt at a time, a full `dvc repro` and a gate-only `dvc exp run`.

    python -m bench.model --work bench/work/model --out bench/work/model.json [--train-steps 120] [--prompts 128]

It runs in a throwaway git+dvc copy of the project with the example snapshot as data/raw (the model half
doesn't scale with the bench corpus: train takes a fixed number of steps). bench.run calls it unless
--no-model. Timings are wall-clock on whatever machine runs it; the eval comparison is made in one process,
on the same prompts and model, so its ratio holds on a busy machine.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
TIMING = re.compile(r"timing \(not in DVC metrics\): (\{.*\})")


def _copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if f.startswith(("data/raw/", "bench/work/")) or not src.is_file():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / f)
    shutil.copytree(ROOT / "examples" / "snapshot", dest / "data" / "raw")


def _sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-2000:]}")
    return wall, p.stdout + p.stderr


def pipeline_figures(dest: Path, train_steps: int, env: dict[str, str]) -> dict[str, Any]:
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["train"]["max_steps"] = train_steps
    params["eval"].update(max_examples=64, bootstrap_samples=500)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=bench@localhost", "-c", "user.name=bench"]
    _sh(["git", "init", "-q"], dest, env)
    _sh(["git", "add", "-A"], dest, env)
    _sh([*git, "commit", "-qm", "bench copy"], dest, env)
    repro_s, out = _sh(["dvc", "repro"], dest, env)
    m = TIMING.search(out)
    timing = ast.literal_eval(m.group(1)) if m else {}
    train_metrics = orjson.loads((dest / "metrics" / "train.json").read_bytes())
    _sh(["git", "add", "-A"], dest, env)
    _sh([*git, "commit", "-qm", "repro"], dest, env)
    noop_s, noop_out = _sh(["dvc", "repro"], dest, env)
    gate_s, gate_out = _sh(["dvc", "exp", "run", "-S", "gate.min_delta_exact_match=0.3"], dest, env)
    reran = sorted(set(re.findall(r"Running stage '(\w+)'", gate_out)))
    return {
        "train": {
            "steps": train_metrics["steps"], "examples": train_metrics["train_examples"],
            "base_params": train_metrics["base_params"], "trainable_params": train_metrics["trainable_params"],
            "device": train_metrics["device"], "precision": train_metrics["precision"],
            "train_seconds": timing.get("train_seconds"), "base_build_seconds": timing.get("base_build_seconds"),
            "tokens_per_s": timing.get("train_tokens_per_second"),
            "note": f"LoRA on the embedded base, {train_steps} optimizer steps of train.batch_size "
                    f"{params['train']['batch_size']}; tokens/s counts every token of the batches (prompt and answer)",
        },
        "full_repro": {"seconds": round(repro_s, 2), "note": "`dvc repro` of every stage on the example snapshot, "
                       f"train.max_steps {train_steps}, eval.max_examples 64"},
        "noop_repro_all_stages": {"seconds": round(noop_s, 2), "ran": "Running stage" in noop_out},
        "exp_run_gate": {"seconds": round(gate_s, 2), "stages_run": reran,
                         "note": "`dvc exp run -S gate.min_delta_exact_match=0.3` after a full `dvc repro`"},
    }


def eval_figures(model_dir: Path, val: Path, eval_path: Path, prompts: int) -> dict[str, Any]:
    """The same prompts through eval's own generate(), batched as params.yaml says and one at a time."""
    import torch

    from schemas.training import EvalParams
    from stages.core import load_params
    from stages.eval import generate, load_cases, load_models

    ep = load_params(ROOT / "params.yaml", "eval", EvalParams)
    torch.set_num_threads(ep.cpu_threads or os.cpu_count() or 1)
    model, tokenizer, _ = load_models(model_dir, model_dir.parent / "base")  # dvc.yaml's data/base beside data/train
    cases = load_cases(str(val), str(eval_path), True, prompts)
    batch = [(c["prompt"], c["tools"]) for c in cases]
    res: dict[str, Any] = {"prompts": len(batch), "max_new_tokens": ep.max_new_tokens, "batch_size": ep.batch_size,
                           "torch_threads": torch.get_num_threads()}
    outs = {}
    for name, bs in (("batched", ep.batch_size), ("one_at_a_time", 1)):
        t = time.perf_counter()
        outs[name], _ = generate(model, tokenizer, batch, bs, ep.max_new_tokens, ep.max_prompt_tokens, name)
        wall = time.perf_counter() - t
        res[name] = {"seconds": round(wall, 3), "prompts_per_s": round(len(batch) / wall, 2)}
    res["speedup"] = round(res["one_at_a_time"]["seconds"] / res["batched"]["seconds"], 2)
    res["same_text_share"] = round(sum(a == b for a, b in zip(outs["batched"], outs["one_at_a_time"])) / len(batch), 4)
    return res


def run(work: Path, train_steps: int, prompts: int) -> dict[str, Any]:
    dest = work / "p"
    shutil.rmtree(work, ignore_errors=True)
    _copy_project(dest)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "FLYWHEEL_ID_KEY": "bench-model-key-not-secret", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("FLYWHEEL_ID_KEY_FILE", None)
    res = pipeline_figures(dest, train_steps, env)
    cmd = [sys.executable, "-m", "bench.model", "--eval-only", str(dest), "--prompts", str(prompts)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"eval timing failed:\n{p.stderr[-2000:]}")
    res["eval_generation"] = orjson.loads(p.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="scratch folder (replaced)")
    ap.add_argument("--out", type=Path, help="JSON file for the figures")
    ap.add_argument("--train-steps", type=int, default=120)
    ap.add_argument("--prompts", type=int, default=128, help="held-out prompts for the generation comparison")
    ap.add_argument("--eval-only", type=Path, help=argparse.SUPPRESS)  # a project copy after `dvc repro`
    a = ap.parse_args(argv)
    if a.eval_only:
        d = a.eval_only
        res = eval_figures(d / "data/train", d / "data/build_dataset/val.jsonl", d / "data/build_dataset/eval.jsonl",
                           a.prompts)
        sys.stdout.write(orjson.dumps(res).decode() + "\n")
        return
    if not a.work or not a.out:
        ap.error("--work and --out are required")
    res = run(a.work.resolve(), a.train_steps, a.prompts)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_bytes(orjson.dumps(res, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n")
    print(orjson.dumps(res, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
