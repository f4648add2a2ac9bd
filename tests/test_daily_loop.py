"""The daily loop as users run it: where the key is found, progress on stderr, `make report`, the CI
workflow and the agent skill (every command they name exists). The fresh-clone run of plain `dvc`
commands is tests/test_fresh_clone.py."""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts.key import ensure_key
from scripts.report import threshold_changes, workflow_table
from stages.core import KeyedHasher, Progress, find_key, load_key, progress, user_key_path

ROOT = Path(__file__).resolve().parents[1]
KEY_A = b"a" * 64
KEY_B = b"b" * 64


# ------------------------------------------------------------------------------------------------ the key
def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), **extra}


def test_user_key_path_follows_xdg_and_defaults_to_dot_config(tmp_path):
    assert user_key_path({"HOME": "/h"}) == Path("/h/.config/agent-flywheel/id_key")
    assert user_key_path({"HOME": "/h", "XDG_CONFIG_HOME": "/x"}) == Path("/x/agent-flywheel/id_key")


def test_key_search_order(tmp_path):
    user = user_key_path(_env(tmp_path))
    user.parent.mkdir(parents=True)
    user.write_bytes(KEY_A + b"\n")
    other = tmp_path / "team_key"
    other.write_bytes(KEY_B)
    assert find_key(_env(tmp_path), tmp_path) == (KEY_A, str(user))
    assert find_key(_env(tmp_path, FLYWHEEL_ID_KEY_FILE=str(other)), tmp_path) == (KEY_B, str(other))
    got = find_key(_env(tmp_path, FLYWHEEL_ID_KEY="from-the-variable-0123456789", FLYWHEEL_ID_KEY_FILE=str(other)))
    assert got == (b"from-the-variable-0123456789", "FLYWHEEL_ID_KEY")


def test_legacy_repo_key_still_works_and_says_how_to_move_it(tmp_path, capsys):
    (tmp_path / ".flywheel").mkdir()
    (tmp_path / ".flywheel/id_key").write_bytes(KEY_B + b"\n")
    assert find_key(_env(tmp_path), tmp_path) == (KEY_B, ".flywheel/id_key")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert load_key(_env(tmp_path)) == KEY_B
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "make key" in err and KEY_B.decode() not in err


def test_missing_key_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(SystemExit) as e:
        find_key(_env(tmp_path), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "make key" in msg and "FLYWHEEL_ID_KEY" in msg
    with pytest.raises(SystemExit) as e:  # named explicitly but absent: say so, don't look elsewhere
        find_key(_env(tmp_path, FLYWHEEL_ID_KEY_FILE=str(tmp_path / "nope")), tmp_path)
    assert "nope" in str(e.value) and "does not exist" in str(e.value)


def test_two_different_keys_are_refused_without_printing_either(tmp_path):
    user = user_key_path(_env(tmp_path))
    user.parent.mkdir(parents=True)
    user.write_bytes(KEY_A)
    (tmp_path / ".flywheel").mkdir()
    (tmp_path / ".flywheel/id_key").write_bytes(KEY_B)
    with pytest.raises(SystemExit) as e:
        find_key(_env(tmp_path), tmp_path)
    msg = str(e.value)
    assert "two different" in msg and KEY_A.decode() not in msg and KEY_B.decode() not in msg


def test_make_key_creates_a_private_key_once_and_never_prints_it(tmp_path):
    env = _env(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    first = ensure_key(env, tmp_path)
    path = tmp_path / "cfg/agent-flywheel/id_key"
    key = path.read_bytes().strip()
    assert "created" in first and str(path) in first and key.decode() not in first
    assert len(key) == 64 and path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert KeyedHasher(key).fingerprint() in first
    second = ensure_key(env, tmp_path)
    assert "nothing to do" in second and path.read_bytes().strip() == key


def test_make_key_moves_an_existing_repo_key_so_outputs_stay_the_same(tmp_path):
    (tmp_path / ".flywheel").mkdir()
    (tmp_path / ".flywheel/id_key").write_bytes(KEY_B + b"\n")
    env = _env(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    msg = ensure_key(env, tmp_path)
    assert "copied" in msg and KEY_B.decode() not in msg
    assert find_key(env, tmp_path) == (KEY_B, str(tmp_path / "cfg/agent-flywheel/id_key"))


def test_make_key_target(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("FLYWHEEL_ID_KEY", None)
    env.pop("FLYWHEEL_ID_KEY_FILE", None)
    # -o: the venv is this one; the test is about the key, not about reinstalling
    p = subprocess.run(["make", "-s", "-o", ".venv/.installed", "key"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    key = (tmp_path / "agent-flywheel/id_key").read_text().strip()
    # created, or copied from a checkout's .flywheel/id_key of an earlier version
    assert ("created" in p.stdout or "copied" in p.stdout) and key not in p.stdout + p.stderr


# ------------------------------------------------------------------------------------------------ progress
class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_is_rate_limited():
    clock, out = _Clock(), io.StringIO()
    p = Progress("redact", total_bytes=1100 * 100, every=5.0, stream=out, clock=clock)
    for _ in range(1100):  # 1,100 updates over 11 s: two lines (at ~5 s and ~10 s), not a thousand
        clock.t += 0.01
        p.update(10, 100)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and p.lines == 2
    assert re.fullmatch(r"redact: [\d,]+ records, [\d,]+/s, \d+% of 0\.1 MB, ETA \d+:\d\d", lines[0]), lines[0]
    assert lines[0].startswith("redact: 5,010 records, 1,000/s, 46% of 0.1 MB, ETA 0:05"), lines[0]


def test_progress_is_silent_on_short_runs_and_when_off(monkeypatch):
    clock, out = _Clock(), io.StringIO()
    p = Progress("x", every=5.0, stream=out, clock=clock)
    for _ in range(100):
        clock.t += 0.01
        p.update(1)
    assert out.getvalue() == ""
    monkeypatch.setenv("FLYWHEEL_PROGRESS_SECONDS", "off")
    p = Progress("x", stream=out, clock=clock)
    for _ in range(100):
        clock.t += 10
        p.update(1)
    assert out.getvalue() == ""
    monkeypatch.setenv("FLYWHEEL_PROGRESS_SECONDS", "soon")
    with pytest.raises(SystemExit):
        Progress("x")


def test_progress_wrapper_yields_results_unchanged_and_checks_alignment():
    blocks = [("f", 0, 10), ("f", 10, 30)]
    out = io.StringIO()
    assert list(progress(iter(["a", "b"]), blocks, "x", len, every=0, stream=out)) == ["a", "b"]
    assert out.getvalue().splitlines()[-1].startswith("x: 2 records") and "100% of" in out.getvalue()
    with pytest.raises(ValueError):  # a result without its block is a bug, not a silent stop
        list(progress(iter(["a"]), blocks, "x", len, every=0, stream=out))


def _run_data_stages(out: Path, progress_setting: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLYWHEEL_ID_KEY": "progress-test-key-0123456789", "FLYWHEEL_PROGRESS_SECONDS": progress_setting}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in ("redact", "export", "build_dataset"):
        params[stage]["workers"] = 2  # the block-parallel path, whatever this machine's core count
    pfile = out.parent / f"params-{out.name}.yaml"
    pfile.write_text(yaml.safe_dump(params))
    py = sys.executable
    cmds = [
        f"{py} -m stages.redact --params {pfile} --raw examples/snapshot --out {out}/redact --metrics {out}/redact.json",
        f"{py} -m stages.export --params {pfile} --traces {out}/redact/traces.jsonl --out {out}/export "
        f"--metrics {out}/export.json",
        f"{py} -m stages.build_dataset --params {pfile} --traces {out}/redact/traces.jsonl --rejects "
        f"{out}/redact/rejects.jsonl --export {out}/export --out {out}/bd --manifest {out}/bd/dataset_manifest.json",
    ]
    p = subprocess.run(" && ".join(cmds), shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return p


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_progress_goes_to_stderr_only_and_never_changes_an_output(tmp_path):
    loud = _run_data_stages(tmp_path / "loud", "0")  # a line after every block
    quiet = _run_data_stages(tmp_path / "quiet", "off")
    for stage in ("redact", "export", "build_dataset traces", "build_dataset write"):
        assert re.search(rf"^{stage}: [\d,]+ records, [\d,]+/s, \d+% of", loud.stderr, re.M), (stage, loud.stderr)
    assert "records, " not in quiet.stderr and "ETA" not in loud.stdout and loud.stdout == quiet.stdout
    a, b = _tree(tmp_path / "loud"), _tree(tmp_path / "quiet")
    assert a.keys() == b.keys() and len(a) > 10
    assert a == b
    assert not any(b"ETA " in data or b"records/s" in data for data in a.values())


# -------------------------------------------------------------------------------------------------- report
def test_threshold_changes_name_loosened_gates():
    base = {"gate": {"min_delta_exact_match": 0.05, "max_workflow_regression": 0.05, "require_leak_scan_ok": True,
                     "min_eval_examples": 50}}
    now = {"gate": {"min_delta_exact_match": 0.01, "max_workflow_regression": 0.02, "require_leak_scan_ok": False,
                    "min_eval_examples": 50}}
    lines = threshold_changes(base, now)
    assert lines == [
        "- stricter: `gate.max_workflow_regression` 0.05 -> 0.02",
        "- **LOOSENED**: `gate.min_delta_exact_match` 0.05 -> 0.01",
        "- **LOOSENED**: `gate.require_leak_scan_ok` True -> False",
    ]
    assert threshold_changes(None, now) == [] and threshold_changes(now, now) == []


def test_workflow_table_deltas():
    head = "label,workflow,model,n,exact_match,keyword_recall,token_f1\n"
    now = head + "ALL / baseline,ALL,baseline,10,0.1,0,0\nALL / adapter,ALL,adapter,10,0.4,0,0\n" \
                 "a / baseline,a,baseline,4,0.25,0,0\na / adapter,a,adapter,4,0.5,0,0\n"
    base = head + "ALL / adapter,ALL,adapter,10,0.3,0,0\n"
    rows = workflow_table(now, base).splitlines()
    assert rows[2] == "| a | 4 | 0.250 | 0.500 | +0.250 | - | - |"
    assert rows[3] == "| ALL | 10 | 0.100 | 0.400 | +0.300 | 0.300 | +0.100 |"


def _mini_repo(dest: Path) -> dict[str, str]:
    """A small DVC repo with this project's Makefile, scripts and dvc.yaml, and hand-made metrics on a
    `main` commit, then a branch that loosens a gate threshold and moves the metrics."""
    for rel in ("Makefile", "dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy2(ROOT / rel, dest / rel)
    for rel in ("scripts", "stages", "schemas"):
        shutil.copytree(ROOT / rel, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".venv").symlink_to((ROOT / ".venv").resolve())
    (dest / ".gitignore").write_text("/.venv\n/report/\n")
    (dest / "metrics").mkdir()
    (dest / "data/gate").mkdir(parents=True)
    csv_head = "label,workflow,model,n,exact_match,keyword_recall,token_f1\n"
    (dest / "metrics/eval_by_workflow.csv").write_text(
        csv_head + "ALL / baseline,ALL,baseline,20,0.1,0.2,0.3\nALL / adapter,ALL,adapter,20,0.2,0.3,0.4\n")
    (dest / "metrics/train_loss.csv").write_text("step,loss,val_loss\n0,,3.0\n1,2.5,\n2,2.0,1.9\n")
    (dest / "metrics/train.json").write_text('{"train_loss": 2.0, "val_loss": 1.9}\n')
    (dest / "data/gate/gate_decision.json").write_text('{"promote": true, "checks": {"a_ok": true, "b_ok": true}}\n')
    (dest / "data/gate/gate.md").write_text("## Adapter gate: PROMOTE\n\n| check | pass |\n|---|---|\n| a_ok | yes |\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    sh = lambda cmd: subprocess.run(cmd, shell=True, cwd=dest, env=env, check=True, capture_output=True)  # noqa: E731
    sh("git init -q -b main && dvc init -q && git add -A && git commit -qm base && git checkout -qb change")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["gate"]["min_delta_exact_match"] = 0.01
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / "metrics/eval_by_workflow.csv").write_text(
        csv_head + "ALL / baseline,ALL,baseline,20,0.1,0.2,0.3\nALL / adapter,ALL,adapter,20,0.35,0.3,0.4\n")
    (dest / "metrics/train.json").write_text('{"train_loss": 1.5, "val_loss": 1.4}\n')
    (dest / "metrics/train_loss.csv").write_text("step,loss,val_loss\n0,,3.0\n1,2.0,\n2,1.5,1.4\n")
    return env


def test_make_report_writes_one_markdown_file_with_everything(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _mini_repo(repo)
    p = subprocess.run(["make", "-s", "-o", ".venv/.installed", "report"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    text = (repo / "report/report.md").read_text()
    assert "**Gate: PROMOTE** (2/2 checks; all checks pass)" in text
    assert "### Adapter gate: PROMOTE" in text  # gate.md nested one level down
    assert re.search(r"^## Metrics vs `main`\n\n<details><summary>2 values changed</summary>\n\n\| Path .*\n.*\n\| metrics/train.json +\| train_loss +\| 2\.0 +\| 1\.5 +\| -0\.5 ",
                     text, re.M), text
    assert "**LOOSENED**: `gate.min_delta_exact_match` 0.05 -> 0.01" in text
    assert "| ALL | 20 | 0.100 | 0.350 | +0.250 | 0.200 | +0.150 |" in text
    assert "![train_loss" in text and "(train_loss.png)" in text
    png = (repo / "report/train_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    again = subprocess.run(["make", "-s", "-o", ".venv/.installed", "report"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and (repo / "report/report.md").read_text() == text  # no clock in it


def test_report_without_the_base_branch_says_so_and_still_works(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _mini_repo(repo)
    p = subprocess.run([sys.executable, "-m", "scripts.report", "--base", "release", "--out", "out/r.md"], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    text = (repo / "out/r.md").read_text()
    assert "Base branch `release` not found" in text and "## Metrics vs `HEAD` (last commit)" in text
    assert "**LOOSENED**: `gate.min_delta_exact_match`" in text  # against the last commit


# ------------------------------------------------------------------------- commands named in docs and CI
def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-zA-Z][\w-]*):(?!=)", text, re.M))


def _dvc_commands() -> dict[str, set[str]]:
    """dvc's own command tree: top-level command -> its subcommands (empty when it has none)."""
    from dvc.cli.parser import get_main_parser

    def subs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    return {name: set(subs(p)) for name, p in subs(get_main_parser()).items()}


def check_commands(text: str, where: str) -> int:
    """Every `make X`, `dvc X [Y]` and `python -m pkg.mod` in `text` exists. Returns how many were checked."""
    targets, dvc = _make_targets(), _dvc_commands()
    n = 0
    for m in re.finditer(r"\bmake (?:-\S+ )*([a-z][\w-]*)\b(?!\.)", text):
        assert m.group(1) in targets, f"{where}: `make {m.group(1)}` is not a Makefile target"
        n += 1
    for m in re.finditer(r"(?<![\w/.-])dvc ([a-z][\w-]*)(?: ([a-z][\w-]*))?", text):
        cmd, sub = m.groups()
        assert cmd in dvc, f"{where}: `dvc {cmd}` is not a dvc command"
        if dvc[cmd]:
            assert sub in dvc[cmd], f"{where}: `dvc {cmd} {sub}` is not a dvc command"
        n += 1
    for m in re.finditer(r"python3? -m ((?:stages|scripts|schemas)\.\w+)", text):
        assert (ROOT / (m.group(1).replace(".", "/") + ".py")).is_file(), f"{where}: no module {m.group(1)}"
        n += 1
    return n


def test_command_checker_catches_what_does_not_exist():
    with pytest.raises(AssertionError):
        check_commands("run `make deploy`", "x")
    with pytest.raises(AssertionError):
        check_commands("run `dvc exp launch`", "x")
    with pytest.raises(AssertionError):
        check_commands("python -m stages.nothing", "x")
    assert check_commands("make gate; dvc exp run -S a=1; dvc repro; python -m stages.gate", "x") == 4


def _workflow() -> dict:
    return yaml.safe_load((ROOT / ".github/workflows/flywheel.yml").read_text())


def test_ci_workflow_pulls_reproduces_gates_and_comments_the_report():
    wf = _workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert "pull_request" in on
    assert wf["permissions"]["pull-requests"] == "write"
    (job,) = wf["jobs"].values()
    steps = job["steps"]
    assert all(("uses" in s) != ("run" in s) for s in steps), "each step either uses an action or runs a command"
    runs = "\n".join(s.get("run", "") for s in steps)
    check_commands(runs, "flywheel.yml")
    order = [i for needle in ("dvc pull", "dvc repro", "make gate", "make report", "cml comment")
             for i, s in enumerate(steps) if needle in s.get("run", "")]
    assert len(order) == 5 and order == sorted(order), order
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    assert {"actions/checkout", "actions/setup-python", "iterative/setup-cml"} <= set(uses)
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # the base branch must be in the history for the diff
    gate = next(s for s in steps if "make gate" in s.get("run", ""))
    assert gate["continue-on-error"] is True and any(f"steps.{gate['id']}.outcome" in str(s.get("if", "")) for s in steps)
    assert "secrets.FLYWHEEL_ID_KEY" in str(job.get("env"))
    assert "report/report.md" in runs  # the file `make report` writes by default
    assert re.search(r"^REPORT \?= report/report.md$", (ROOT / "Makefile").read_text(), re.M)


def _skill() -> tuple[dict, str]:
    text = (ROOT / "skills/agent-flywheel/SKILL.md").read_text()
    m = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert m, "SKILL.md must open with YAML frontmatter between --- lines"
    return yaml.safe_load(m.group(1)), m.group(2)


def test_skill_frontmatter():
    meta, body = _skill()
    assert meta["name"] == "agent-flywheel" == (ROOT / "skills/agent-flywheel").name
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", meta["name"]) and len(meta["name"]) <= 64
    assert isinstance(meta["description"], str) and 50 < len(meta["description"]) <= 1024
    assert len(body.strip().splitlines()) > 20


def test_skill_names_only_commands_that_exist_and_keeps_the_rules():
    meta, body = _skill()
    assert check_commands(body, "SKILL.md") >= 15
    # A file the skill names is a stage output: named in dvc.yaml, or inside an output folder dvc.yaml names
    # (data/export/flywheel-metrics.json). Not "exists here": a clean clone has no outputs yet.
    outs = {next(iter(o)) if isinstance(o, dict) else o for st in yaml.safe_load((ROOT / "dvc.yaml").read_text())[
        "stages"].values() for key in ("outs", "metrics") for o in st.get(key, [])}
    for path in re.findall(r"`((?:data|metrics)/[\w./-]+\.(?:md|json|csv))`", body):
        if "<" not in path:
            assert any(path == o or path.startswith(o.rstrip("/") + "/") for o in outs), f"SKILL.md names {path}"
    low = body.lower()
    assert "never print the id-hashing key" in low and "never commit raw data" in low
    assert "never loosen a gate threshold without saying so" in low
    assert str(user_key_path({"HOME": "~"})) in body  # ~/.config/agent-flywheel/id_key: where core.find_key looks


def test_claude_code_and_opencode_find_the_skill_in_the_repo():
    link = ROOT / ".claude/skills/agent-flywheel"
    assert link.is_symlink() and link.resolve() == (ROOT / "skills/agent-flywheel").resolve()
    assert (link / "SKILL.md").is_file()


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    assert check_commands(blocks, "README.md") >= 20
