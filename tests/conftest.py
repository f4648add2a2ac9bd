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
