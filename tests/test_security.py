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
    src = "\n".join((ROOT / "stages" / f).read_text() for f in ("base.py", "train.py", "eval.py", "basemodel.py"))
    assert "trust_remote_code=True" not in src
    assert "use_safetensors=False" not in src


def test_data_stages_do_not_import_the_ml_stack():
    import subprocess
    import sys
    code = ("import sys; import stages.redact, stages.export, stages.build_dataset, stages.ingest; "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _tiny_base(folder: Path, safetensors: bool, remote_code_marker: Path | None = None) -> None:
    """A 2-layer Llama saved as a local base model; optionally with an auto_map that points at code which
    would leave a marker file if it were ever imported."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.basemodel import build_tokenizer

    tok = build_tokenizer(["hello world, a tiny corpus for a tiny tokenizer"] * 4, 300, 64)
    tok.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    if not safetensors:  # transformers 5 only writes safetensors: make the pickle the old way
        import torch

        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    if remote_code_marker is not None:
        (folder / "evil_modeling.py").write_text(
            f"open({str(remote_code_marker)!r}, 'w').write('ran')\n"
            "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
        import json
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "evil_modeling.EvilForCausalLM"}
        (folder / "config.json").write_text(json.dumps(config))


def test_base_model_loads_only_from_safetensors_and_never_runs_repo_code(tmp_path):
    """A local-folder base (the base stage) then loaded as train loads it."""
    from schemas.training import BaseParams
    from stages.base import BaseError
    from stages.base import run as materialise
    from stages.train import load_base

    marker = tmp_path / "remote-code-ran"
    good = tmp_path / "good"
    good.mkdir()
    _tiny_base(good, safetensors=True, remote_code_marker=marker)
    man = materialise(BaseParams(source=str(good)), "unused.jsonl", tmp_path / "data/base")
    assert man.kind == "folder" and man.name == "good"  # named by the folder, never by its path
    assert not (tmp_path / "data/base/evil_modeling.py").exists()  # code is never copied
    model, _, _ = load_base(tmp_path / "data/base", "none", cuda=False, bf16=False, gradient_checkpointing=False)
    assert type(model).__name__ == "LlamaForCausalLM"  # the library's own class, not the repo's
    assert not marker.exists(), "code shipped with the model was imported"

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    _tiny_base(pickled, safetensors=False)
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    with pytest.raises(BaseError, match="cannot load base model pickled: no \\*.safetensors.*pickles are never loaded"):
        materialise(BaseParams(source=str(pickled)), "unused.jsonl", tmp_path / "data/base2")


def test_the_hashing_key_never_reaches_an_output_or_a_log(tmp_path):
    """The data stages and the leak scan as dvc.yaml runs them, key in the environment: neither the key nor
    its hex form appears in anything they write or print, a hostile line's error included."""
    import os
    import subprocess
    import sys

    key = "k3y-" + "9f8e7d6c5b4a" * 4
    raw = tmp_path / "data/raw"
    shutil.copytree(ROOT / "examples/snapshot", raw)
    (raw / "traces/hostile.jsonl").write_text('{"messages": [{"role": "user", "content": "' + key + '"}]\n{"id": \n')
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "FLYWHEEL_ID_KEY": key, "PYTHONPATH": str(ROOT)}
    env.pop("FLYWHEEL_ID_KEY_FILE", None)
    cmds = [
        "stages.redact --params params.yaml --raw data/raw --out data/redact --metrics metrics/redact.json",
        "stages.export --params params.yaml --traces data/redact/traces.jsonl --out data/export --metrics metrics/export.json",
        "stages.build_dataset --params params.yaml --traces data/redact/traces.jsonl --rejects data/redact/rejects.jsonl "
        "--export data/export --out data/build_dataset --manifest data/build_dataset/dataset_manifest.json",
        "stages.leaks --params params.yaml --out data/leaks --scan data/redact data/export data/build_dataset metrics",
    ]
    logs = b""
    for cmd in cmds:
        p = subprocess.run([sys.executable, "-m", *cmd.split()], cwd=tmp_path, env=env, capture_output=True)
        assert p.returncode == 0, p.stderr.decode()
        logs += p.stdout + p.stderr
    written = b"".join(f.read_bytes() for f in sorted(tmp_path.rglob("*")) if f.is_file()
                       and "raw" not in f.relative_to(tmp_path).parts)
    for form in (key.encode(), key.encode().hex().encode()):
        assert form not in logs and form not in written
    import json
    report = json.loads((tmp_path / "data/leaks/leak_report.json").read_text())
    assert report["ok"] and report["files_scanned"] >= 10 and report["lines_scanned"] > 1000
