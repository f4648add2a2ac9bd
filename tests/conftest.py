"""Shared fixtures: a test key and a way to lay out a small raw snapshot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from stages.basemodel import pin_cpu_math  # noqa: E402

# Stages run in this process too (and in subprocesses, which pin it themselves): pin MKL's math before any test
# imports torch, or an in-process run and a subprocess run could round differently.
pin_cpu_math()

TEST_KEY = b"test-key-0123456789abcdef-not-for-production"


@pytest.fixture
def key() -> bytes:
    return TEST_KEY


def write_snapshot(root: Path, files: dict[str, list]) -> Path:
    """files: snapshot-relative path -> list of records (dicts are dumped, bytes/str written raw)."""
    for rel, lines in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            for line in lines:
                if isinstance(line, bytes):
                    fh.write(line + b"\n")
                elif isinstance(line, str):
                    fh.write(line.encode() + b"\n")
                else:
                    fh.write(json.dumps(line).encode() + b"\n")
    return root


def small_model_half(params_path: Path) -> None:
    """A tiny model half (4 LoRA steps, 8 eval cases) for tests whose subject is DVC or the daily loop, not the
    model: they stay fast and still run every stage."""
    import yaml

    params = yaml.safe_load(params_path.read_text())
    params["train"].update(max_steps=4, eval_steps=2)
    params["base"]["embedded"].update(pretrain_epochs=1)
    params["eval"].update(max_examples=8, bootstrap_samples=100)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


# ---- the model half on a tiny task: shared by test_train (behaviour) and test_handoffs (the files' models) ----
MODEL_PARAMS = """\
base:
  seed: 3
  max_length: 128
  cpu_threads: 1
  embedded: {vocab_size: 400, hidden_size: 64, intermediate_size: 192, pretrain_epochs: 30, pretrain_lr: 0.01}
train:
  seed: 3
  cpu_threads: 1
  learning_rate: 0.01
  num_epochs: 12
  batch_size: 16
  eval_steps: 12
  max_length: 128
  lora: {r: 8, alpha: 16}
redact: {}
leaks: {workers: 1}
eval:
  batch_size: 16
  bootstrap_samples: 300
gate:
  min_eval_examples: 20
"""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Splits of a tiny intent task (tests/model_fixture.py) and params that train on them in seconds."""
    from model_fixture import write_splits

    folder = tmp_path_factory.mktemp("tiny")
    paths = write_splits(folder / "data", 64, 16, 24, seed=1, kinds=["intent"])
    (folder / "params.yaml").write_text(MODEL_PARAMS)
    return folder, paths


def _params(folder: Path, run: str) -> str:
    return str(folder / ("params_b.yaml" if run == "run_b" else "params.yaml"))


def _base_argv(folder: Path, paths: dict, run: str) -> list[str]:
    return ["--params", _params(folder, run), "--train", str(paths["train"]), "--out", f"{run}/data/base"]


def _train_argv(folder: Path, paths: dict, run: str) -> list[str]:
    return ["--params", _params(folder, run), "--base", f"{run}/data/base", "--train", str(paths["train"]),
            "--val", str(paths["val"]),
            "--manifest", str(paths["manifest"]), "--out", f"{run}/data/train", "--metrics",
            f"{run}/metrics/train.json", "--loss-csv", f"{run}/metrics/train_loss.csv"]


@pytest.fixture(scope="session")
def two_runs(tiny):
    """base and train twice: in this process with 1 thread, and in a subprocess with another hash seed and 2
    threads (tests/test_train.py compares the two byte for byte, so nothing else writes into either run folder)."""
    folder, paths = tiny
    (folder / "params_b.yaml").write_text(MODEL_PARAMS.replace("cpu_threads: 1", "cpu_threads: 2"))
    cwd = os.getcwd()
    from stages import base as B
    from stages import train as T

    os.chdir(folder)
    try:
        B.main(_base_argv(folder, paths, "run_a"))
        T.main(_train_argv(folder, paths, "run_a") + ["--timing", "timing_a.json"])  # outside run_a: not compared
    finally:
        os.chdir(cwd)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    for stage, argv in (("base", _base_argv), ("train", _train_argv)):
        subprocess.run([sys.executable, "-m", f"stages.{stage}", *argv(folder, paths, "run_b")], cwd=folder,
                       env=env, check=True, capture_output=True)
    return folder / "run_a", folder / "run_b"


@pytest.fixture(scope="session")
def model_half(two_runs, tiny) -> dict[str, Path]:
    """eval, leaks and gate of the first run's adapter, written beside the runs (under e2e/)."""
    from stages import eval as E
    from stages import gate as G
    from stages import leaks as L

    run, _ = two_runs
    folder, paths = tiny
    params, e2e = str(folder / "params.yaml"), folder / "e2e"
    E.main(["--params", params, "--base", str(run / "data/base"), "--model-dir", str(run / "data/train"),
            "--val", str(paths["val"]), "--eval", str(paths["eval"]), "--out", str(e2e / "data/eval"),
            "--per-workflow-csv", str(e2e / "metrics/wf.csv")])
    L.main(["--params", params, "--out", str(e2e / "data/leaks"), "--scan", str(run / "data"), str(e2e / "data/eval"),
            str(paths["manifest"])])
    G.main(["--params", params, "--eval-results", str(e2e / "data/eval/eval_results.json"), "--manifest",
            str(paths["manifest"]), "--leaks", str(e2e / "data/leaks/leak_report.json"), "--out", str(e2e / "data/gate")])
    return {"run": run, "e2e": e2e}
