"""The data stages open no socket; model loading is safetensors-only with remote code off."""
import shutil
import socket
from pathlib import Path

import pytest

from test_data_stages import run_all

ROOT = Path(__file__).resolve().parents[1]


def test_data_stages_run_with_sockets_blocked(tmp_path, key, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    raw = tmp_path / "raw"
    shutil.copytree(ROOT / "examples/snapshot", raw)
    out = run_all(raw, tmp_path / "w", key)
    assert out["manifest"]["accounting"]["ok"]


def test_no_trust_remote_code_and_safetensors_only_in_model_code():
    src = "\n".join((ROOT / "stages" / f).read_text() for f in ("train.py", "eval.py", "basemodel.py"))
    assert "trust_remote_code=True" not in src
    assert "use_safetensors=False" not in src


def test_data_stages_do_not_import_the_ml_stack():
    import subprocess
    import sys
    code = ("import sys; import stages.redact, stages.export, stages.build_dataset, stages.ingest; "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
