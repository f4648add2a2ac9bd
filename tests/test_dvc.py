"""dvc.yaml is honest (every cmd path declared) and the data half reproduces through real `dvc repro`."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import small_model_half

ROOT = Path(__file__).resolve().parents[1]
DATA_STAGES = ["redact", "export", "build_dataset"]


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _declared(stage: dict) -> set[str]:
    paths = set()
    for section in ("deps", "outs", "metrics", "plots"):
        for item in stage.get(section, []):
            paths.add(next(iter(item)) if isinstance(item, dict) else item)
    return paths


def test_every_cmd_path_is_a_declared_dep_or_out():
    for name, stage in _dvc_yaml()["stages"].items():
        declared = _declared(stage)
        words = shlex.split(stage["cmd"])
        for flag, value in zip(words, words[1:]):
            if not flag.startswith("--") or value.startswith("--"):
                continue
            if "/" in value or value.endswith((".yaml", ".json", ".jsonl", ".csv")):
                if value == "params.yaml":
                    assert stage.get("params"), f"{name}: reads params.yaml but declares no params"
                    continue
                covered = any(value == d or value.startswith(d.rstrip("/") + "/") or d.startswith(value.rstrip("/") + "/")
                              for d in declared)
                assert covered, f"stage {name}: {flag} {value} is neither a dep nor an out"


def test_stage_names_match_modules_params_and_folders():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in _dvc_yaml()["stages"].items():
        assert f"python -m stages.{name} " in stage["cmd"] or stage["cmd"].startswith(f"python -m stages.{name}")
        assert (ROOT / "stages" / f"{name}.py").exists()
        assert name in params, f"params.yaml has no '{name}' section"
        assert any(f"data/{name}" in p for p in _declared(stage)), f"{name} writes no data/{name} output"


def test_dvc_analytics_off():
    cfg = (ROOT / ".dvc/config").read_text()
    assert "analytics = false" in cfg
    assert "check_update = false" in cfg  # `dvc version` would otherwise ask the network for the latest release


def test_dvc_cache_links_instead_of_copying():
    """Large outputs are linked with the cache, not copied into it. DVC (3.x) moves a new stage output into the
    cache by link only when the first cache type is `hardlink` (that move itself tries reflink, hardlink, copy),
    and it never relinks a file it takes for a reflink or a copy: with `reflink` first, as in its default, every
    output is copied on ext4. Hardlinks are safe here: every stage replaces its files, and DVC removes outputs
    before a stage runs. Copy stays the last resort."""
    from dvc.config import Config

    repo = Config(dvc_dir=str(ROOT / ".dvc"), validate=True).read("repo")  # this file alone, not a user config
    types = [t.strip() for t in repo["cache"]["type"]]
    assert types == ["hardlink", "reflink", "copy"], types


def _run(cmd: str, cwd: Path, env: dict) -> str:
    p = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    return _make_clone(tmp_path_factory.mktemp("clone") / "p")


def _make_clone(dest: Path) -> tuple[Path, dict]:
    """A throwaway copy of the tracked tree with the example snapshot as data/raw."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    shutil.rmtree(dest / "data/raw", ignore_errors=True)
    shutil.copytree(ROOT / "examples/snapshot", dest / "data/raw")
    small_model_half(dest / "params.yaml")  # the behaviour under test is DVC's, not the model's
    env = {**os.environ, "FLYWHEEL_ID_KEY": "dvc-test-key-0123456789abcdef",
           "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    _run("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm init", dest, env)
    return dest, env


def test_repro_is_a_noop_the_second_time_and_param_change_reruns_only_its_stage(clone):
    dest, env = clone
    out = _run(f"dvc repro {' '.join(DATA_STAGES)}", dest, env)
    assert all(f"Running stage '{s}'" in out for s in DATA_STAGES), out
    out = _run(f"dvc repro {' '.join(DATA_STAGES)}", dest, env)
    assert "Running stage" not in out, out
    # Where the filesystem has hardlinks and no reflinks (ext4), an output is a link into the cache, not a copy.
    links = _run("dvc doctor", dest, env).split("Cache types:")[1].split("\n")[0]
    if "hardlink" in links and "reflink" not in links:
        for out in ("data/redact/traces.jsonl", "data/export/training-examples.jsonl", "data/build_dataset/train.jsonl"):
            assert (dest / out).stat().st_nlink == 2, (out, links)
    p = dest / "params.yaml"
    p.write_text(p.read_text().replace("val_ratio: 0.1", "val_ratio: 0.2"))
    out = _run(f"dvc repro {' '.join(DATA_STAGES)}", dest, env)
    assert "Running stage 'build_dataset'" in out and "Running stage 'redact'" not in out \
        and "Running stage 'export'" not in out, out


def test_two_repros_at_once_give_one_clear_lock_error(clone):
    dest, env = clone
    _run("dvc repro redact export build_dataset", dest, env)
    procs = [subprocess.Popen("dvc repro -f -s build_dataset", shell=True, cwd=dest, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    failed = [o for rc, o in outs if rc != 0]
    assert len(failed) == 1, outs
    assert "lock" in failed[0].lower(), failed[0]
    out = _run("dvc status redact export build_dataset", dest, env)
    assert "changed" not in out, out


def test_gate_only_experiment_never_retrains(clone):
    """`dvc exp run -S gate.*` reruns the gate alone: train and eval are not in its deps."""
    dest, env = clone
    _run("dvc repro", dest, env)
    _run("git add -A && git -c user.email=t@t -c user.name=t commit -qm tiny", dest, env)
    out = _run("dvc exp run -S gate.min_delta_exact_match=0.3", dest, env)
    assert "Running stage 'gate'" in out, out
    for stage in ("redact", "export", "build_dataset", "base", "train", "eval", "leaks"):
        assert f"Running stage '{stage}'" not in out, out
    shown = _run("dvc exp show --no-pager --csv", dest, env)
    assert "0.3" in shown


def test_the_base_is_pinned_by_content(clone):
    """dvc.lock records data/base's bytes as a dep of train and eval: one changed byte in one base file and
    `dvc status` shows both as changed (and back to clean with the byte restored)."""
    dest, env = clone
    _run("dvc repro", dest, env)
    lock = yaml.safe_load((dest / "dvc.lock").read_text())["stages"]
    for stage in ("train", "eval"):
        deps = {d["path"]: d for d in lock[stage]["deps"]}
        assert deps["data/base"]["md5"].endswith(".dir"), deps
    assert "changed" not in _run("dvc status train eval", dest, env)
    path = dest / "data/base/config.json"
    original = path.read_bytes()
    path.unlink()  # never edit a file in place that may be a link into the DVC cache
    path.write_bytes(original[:10] + bytes([original[10] ^ 1]) + original[11:])
    try:
        out = _run("dvc status train eval", dest, env)
        for stage in ("train", "eval"):
            assert re.search(rf"^{stage}:\n\s+changed deps:\n\s+modified:\s+data/base$", out, re.M), out
    finally:
        path.unlink()
        path.write_bytes(original)
    assert "changed" not in _run("dvc status train eval", dest, env)


def test_team_sharing_through_a_remote_leaves_nothing_to_do(clone, tmp_path):
    """Push to a local-folder remote, clone afresh, pull: `dvc repro` then has nothing to run."""
    dest, env = clone
    remote = tmp_path / "remote"
    _run("dvc repro", dest, env)
    _run(f"dvc remote add -f -d shared {remote} && git add -A && "
         "git -c user.email=t@t -c user.name=t commit -qm remote --allow-empty", dest, env)
    _run("dvc push -q", dest, env)
    other = tmp_path / "other"
    _run(f"git clone -q {dest} {other}", tmp_path, env)
    _run("dvc pull -q", other, env)
    out = _run("dvc repro", other, env)
    assert "Running stage" not in out, out


def _lock_outs(root: Path) -> dict:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {stage: {o["path"]: (o.get("md5"), o.get("size"), o.get("nfiles")) for o in body.get("outs", [])}
            for stage, body in lock.items()}


def test_two_clones_from_scratch_give_the_same_dvc_lock(clone, tmp_path):
    """Everything, train/eval/gate included on CPU, is the same bytes in a second clone built from scratch."""
    dest, env = clone
    _run("dvc repro", dest, env)
    other, _ = _make_clone(tmp_path / "second")
    shutil.copy2(dest / "params.yaml", other / "params.yaml")  # with the experiment test's gate threshold
    _run("dvc repro", other, env)
    a, b = _lock_outs(dest), _lock_outs(other)
    assert set(a) == set(_dvc_yaml()["stages"])
    assert a == b
    assert all(md5 for outs in a.values() for md5, _, _ in outs.values())
