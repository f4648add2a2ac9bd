"""DONE-CRITERION of issue 13, "the daily loop as users run it": a fresh clone, `make demo`, then plain `dvc`
commands with nothing but the venv activated (no FLYWHEEL_* variable, no Makefile): `dvc repro` has nothing to
do, a gate experiment reruns only the gate, a queued two-value sweep runs in DVC's temp copies (which hold only
tracked files, DVC issue #8854) and finds the key, `dvc exp show`, `dvc metrics diff` and `dvc plots diff` work.
Then the README's five peft lines load the adapter, and a GTO-style tag `flywheel-adapter@v1.0.0` fetches it back
with `dvc artifacts get`.

Kept small so that it fits in `make test`: the clone reuses this checkout's venv (a symlink, as `make install`
would have made it) and commits a reduced model half (4 LoRA steps, 8 eval cases) in its params.yaml. The data
half runs on the full example snapshot. The key goes to a temp XDG_CONFIG_HOME, never to the real one.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from stages.core import KeyedHasher
from tests.conftest import small_model_half

ROOT = Path(__file__).resolve().parents[1]
STAGES = tuple(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])  # every stage of the pipeline


def _copy_checkout(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of this checkout, as a clone would have them."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file() and not src.is_symlink():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    shutil.rmtree(dest / "data/raw", ignore_errors=True)  # `make demo` copies the example snapshot in


def _small_model_half(dest: Path) -> None:
    small_model_half(dest / "params.yaml")


class Shell:
    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd, self.env, self.seen = cwd, env, []

    def __call__(self, cmd: str, timeout: int = 600) -> str:
        p = subprocess.run(cmd, shell=True, cwd=self.cwd, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        out = p.stdout + p.stderr
        self.seen.append(out)
        assert p.returncode == 0, f"`{cmd}` failed ({p.returncode}):\n{out[-4000:]}"
        return out


def _ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", out))


@pytest.mark.done_criterion
def test_fresh_clone_make_demo_then_plain_dvc_daily_loop(tmp_path):
    dest = tmp_path / "clone"
    _copy_checkout(dest)
    _small_model_half(dest)
    (dest / ".venv").symlink_to((ROOT / ".venv").resolve())
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith("FLYWHEEL_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    base_env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "config"), DVC_NO_ANALYTICS="1",
                    GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    (tmp_path / "home").mkdir()
    setup = Shell(dest, base_env)
    setup("git init -q -b main && git add -A && git commit -qm 'fresh clone'")

    # make demo (-o: the venv is already installed; the clone shares it instead of reinstalling)
    out = setup("make -o .venv/.installed demo", timeout=900)
    assert _ran(out) == set(STAGES), out[-3000:]
    key_file = tmp_path / "config/agent-flywheel/id_key"
    assert key_file.is_file() and "created" in out
    key = key_file.read_text().strip()

    # `source .venv/bin/activate`: the venv's bin first on PATH, VIRTUAL_ENV set; nothing else
    env = {**base_env, "VIRTUAL_ENV": str(dest / ".venv"), "PATH": f"{dest / '.venv/bin'}:{base_env['PATH']}"}
    sh = Shell(dest, env)
    try:
        out = sh("dvc repro")
        assert not _ran(out) and "Data and pipelines are up to date" in out, out
        out = sh("dvc repro build_dataset")  # a single stage (and what it depends on)
        assert not _ran(out) and "Stage 'train' didn't change" not in out, out

        out = sh("dvc exp run -S gate.min_delta_exact_match=0.3")
        assert _ran(out) == {"gate"}, out

        # Queued: each runs in a temp copy holding only tracked files (DVC issue #8854). A redact param, so
        # that redact itself reruns there and must find the key (the gate alone never reads it).
        out = sh("dvc exp run --queue -S redact.entropy_min_len=22,24")
        assert out.count("Queued experiment") == 2, out
        sh("dvc queue start")
        deadline = time.monotonic() + 600
        while True:
            status = sh("dvc queue status")
            if not re.search(r"\b(Queued|Running)\b", status) or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert status.count("Success") == 2 and "Failed" not in status, status
        for name in re.findall(r"Queued experiment '([\w-]+)'", out):
            assert "Running stage 'redact'" in sh(f"dvc queue logs {name}"), name  # redact ran in the temp copy

        shown = sh("dvc exp show --no-pager --md --drop '.*' "
                   "--keep 'Experiment|redact.entropy_min_len|gate.min_delta_exact_match|key_fingerprint|promote'")
        header = [c.strip() for c in shown.splitlines()[0].split("|")]
        rows = [dict(zip(header, (c.strip() for c in r.split("|")))) for r in shown.splitlines()
                if r.startswith("|") and "[" in r]  # experiment rows: "├── abc1234 [name]"
        assert sorted(r["redact.entropy_min_len"] for r in rows) == ["20", "22", "24"], shown
        # queued runs start from the workspace, where the first experiment left its 0.3
        assert {r["gate.min_delta_exact_match"] for r in rows} == {"0.3"}, shown
        # the temp copies hashed ids with this user's key: the one `make key` put in the XDG folder
        assert {r["key_fingerprint"] for r in rows} == {KeyedHasher(key.encode()).fingerprint()}, shown
        assert all(r["promote"] in ("True", "False") for r in rows), shown

        out = sh("dvc metrics diff --md")
        assert "data/gate/gate_decision.json" in out and "exact_delta_ok" in out, out  # the 0.3 threshold moved it
        sh("dvc params diff")
        sh("dvc plots diff")
        assert (dest / "dvc_plots/index.html").is_file()

        # README, "Using a promoted adapter": its five peft lines load the adapter this clone trained ...
        readme = (dest / "README.md").read_text()
        snippet = re.search(r"```python\n(.*?)```", readme[readme.index("## Using a promoted adapter"):], re.S).group(1)
        assert len(snippet.strip().splitlines()) == 5
        (tmp_path / "use_adapter.py").write_text(snippet + "out = model.generate(**inputs, max_new_tokens=8)\n"
                                                 "assert out.shape[1] > inputs['input_ids'].shape[1]\n")
        sh(f"python {tmp_path / 'use_adapter.py'}")
        # ... and a GTO-style version tag of the flywheel-adapter artifact fetches it back
        sh("git add -A && git commit -qm 'flywheel: promote adapter' && "
           "git tag -a flywheel-adapter@v1.0.0 -m 'Registering artifact flywheel-adapter version v1.0.0'")
        sh(f"dvc artifacts get {dest} flywheel-adapter --rev v1.0.0 -o {tmp_path / 'got'}")
        assert (tmp_path / "got/adapter_config.json").read_bytes() == \
            (dest / "data/train/adapter/adapter_config.json").read_bytes()
        sh("git tag -a 'flywheel-adapter#prod#1' -m 'Assigning stage prod to artifact flywheel-adapter version v1.0.0'")
        sh(f"dvc artifacts get {dest} flywheel-adapter --stage prod -o {tmp_path / 'prod'}")
        assert (tmp_path / "prod/adapter_model.safetensors").read_bytes() == \
            (dest / "data/train/adapter/adapter_model.safetensors").read_bytes()
    finally:
        subprocess.run("dvc queue stop --kill", shell=True, cwd=dest, env=env, capture_output=True, timeout=120)
    assert not any(key in o for o in setup.seen + sh.seen), "the key was printed"
