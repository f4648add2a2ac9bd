"""A stage killed midway leaves no half-written output, and the rerun matches an uninterrupted run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _big_snapshot(dest: Path, copies: int) -> Path:
    src = ROOT / "examples/snapshot"
    for f in src.rglob("*.jsonl"):
        rel = f.relative_to(src)
        data = f.read_bytes()
        for i in range(copies):
            out = dest / rel.parent / f"{rel.stem}-{i}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            # distinct ids per copy, or every copy after the first would be a duplicate_id reject
            out.write_bytes(data.replace(b'"id": "run_', f'"id": "c{i}_run_'.encode()))
    return dest


def _redact(raw: Path, out: Path, metrics: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.redact", "--params", str(ROOT / "params.yaml"),
                             "--raw", str(raw), "--out", str(out), "--metrics", str(metrics)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_midway_then_rerun_is_identical(tmp_path):
    env = {**os.environ, "FLYWHEEL_ID_KEY": "crash-test-key-0123456789abcdef"}
    raw = _big_snapshot(tmp_path / "raw", copies=25)
    out, metrics = tmp_path / "data/redact", tmp_path / "metrics/redact.json"
    p = _redact(raw, out, metrics, env)
    deadline = time.time() + 60
    # Kill once the stage is writing: its temp folder exists beside the output.
    while time.time() < deadline and not list((tmp_path / "data").glob(".redact.*.tmp")) and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    assert p.poll() is None, "the stage finished before it could be killed: make the input bigger"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists() and not metrics.exists(), "a killed run must not leave an output in place"
    p = _redact(raw, out, metrics, env)
    assert p.wait() == 0, p.stderr.read().decode()
    assert not list((tmp_path / "data").glob(".redact.*")), "temp folders from the killed run are cleaned up"
    clean = tmp_path / "clean"
    p = _redact(raw, clean / "redact", clean / "redact.json", env)
    assert p.wait() == 0
    for name in ("traces.jsonl", "rejects.jsonl"):
        assert (out / name).read_bytes() == (clean / "redact" / name).read_bytes()
    assert metrics.read_bytes() == (clean / "redact.json").read_bytes()
