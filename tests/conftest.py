"""Shared fixtures: a test key and a way to lay out a small raw snapshot."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

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
