"""`make report`: one Markdown review report for a pull request (CI posts it as a comment).

It holds the gate's own report (data/gate/gate.md), `dvc metrics diff --md` and `dvc params diff --md`
against the base branch, a warning for every gate threshold loosened since the base, exact match per
workflow against the base, and the loss plot as a PNG beside the report: DVC's own Vega-Lite spec of the
`train_loss` plot (`dvc plots diff <base> --json`, the chart `dvc plots show` draws), rendered offline with
vl-convert. Not a pipeline stage: it reads what `dvc repro` left and git's copy of the base; it writes no
clock time, so the same inputs give the same bytes.
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

from stages.core import atomic_open, write_text

MARKER = "<!-- agent-flywheel-report -->"  # lets CI find and update its own comment
GATE_MD = Path("data/gate/gate.md")
GATE_DECISION = Path("data/gate/gate_decision.json")
BY_WORKFLOW = Path("metrics/eval_by_workflow.csv")
PLOT = "train_loss"


def _run(cmd: list[str], cwd: Path) -> tuple[int, str]:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return p.returncode, (p.stdout if p.returncode == 0 else (p.stderr or p.stdout)).strip()


def _dvc(args: list[str], cwd: Path) -> tuple[int, str]:
    # This interpreter's dvc, whether or not the venv is on PATH.
    return _run([sys.executable, "-m", "dvc", *args], cwd)


def resolve_base(base: str, cwd: Path) -> str | None:
    """The git revision to compare with: `base` itself, else `origin/<base>` (a CI checkout often has only
    the remote branch); None when neither exists (a fresh repo, a shallow clone)."""
    for rev in (base, f"origin/{base}"):
        rc, _ = _run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd)
        if rc == 0:
            return rev
    return None


def git_show(rev: str, path: Path, cwd: Path) -> str | None:
    rc, out = _run(["git", "show", f"{rev}:{path.as_posix()}"], cwd)
    return out if rc == 0 else None


def demote(md: str) -> str:
    """gate.md's headings one level down, so it nests under this report's sections."""
    return re.sub(r"^(#{1,5}) ", r"#\1 ", md, flags=re.M)


# ------------------------------------------------------------------------------------------- gate thresholds
def _loosened(name: str, old: Any, new: Any) -> bool | None:
    """True when the change lets more adapters through, False when it is stricter, None when unclear."""
    if isinstance(old, bool) or isinstance(new, bool):
        return bool(old) and not bool(new) if name.startswith("require_") else None
    if not all(isinstance(v, (int, float)) for v in (old, new)):
        return None
    if name.startswith("min_"):
        return new < old
    if name.startswith("max_"):
        return new > old
    return None


def threshold_changes(base_params: dict | None, params: dict) -> list[str]:
    """A line per changed `gate.*` param, loosened ones flagged: a review must see them."""
    if base_params is None:
        return []
    old, new = base_params.get("gate") or {}, params.get("gate") or {}
    lines = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        verdict = _loosened(name, a, b)
        tag = {True: "**LOOSENED**", False: "stricter", None: "changed"}[verdict]
        lines.append(f"- {tag}: `gate.{name}` {a!r} -> {b!r}")
    return lines


# --------------------------------------------------------------------------------------------- per workflow
def _rows(text: str) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["workflow"], r["model"]): r for r in csv.DictReader(io.StringIO(text))}


def _f(row: dict[str, str] | None, key: str) -> float | None:
    try:
        return float(row[key]) if row and row.get(key) not in (None, "") else None
    except ValueError:
        return None


def _num(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else (f"{x:+.3f}" if signed else f"{x:.3f}")


def workflow_table(now_csv: str, base_csv: str | None) -> str:
    """Adapter exact match per workflow now and on the base, and the adapter's lead over the baseline."""
    now, base = _rows(now_csv), _rows(base_csv) if base_csv else {}
    workflows = sorted({w for w, _ in now}, key=lambda w: (w == "ALL", w))
    out = ["| workflow | n | baseline | adapter | adapter - baseline | adapter on base | change vs base |",
           "|---|---|---|---|---|---|---|"]
    for w in workflows:
        a, b = now.get((w, "adapter")), now.get((w, "baseline"))
        ea, eb, eo = _f(a, "exact_match"), _f(b, "exact_match"), _f(base.get((w, "adapter")), "exact_match")
        lead = None if ea is None or eb is None else ea - eb
        change = None if ea is None or eo is None else ea - eo
        n = (a or b or {}).get("n", "-")
        out.append(f"| {w} | {n} | {_num(eb)} | {_num(ea)} | {_num(lead, True)} | {_num(eo)} | {_num(change, True)} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ loss plot
def loss_plot(cwd: Path, base_rev: str | None, png: Path) -> str:
    """Render DVC's Vega-Lite spec of the loss plot (with the base's curve when there is one) to `png`.

    Returns the Markdown to embed, or a line saying why there is no picture.
    """
    cmd = ["dvc", "plots", "diff", base_rev, "--json"] if base_rev else ["dvc", "plots", "show", "--json"]
    rc, out = _dvc(cmd[1:], cwd)
    if rc != 0:
        return f"_No loss plot: `{' '.join(cmd)}` failed: {out.splitlines()[-1] if out else 'no output'}_"
    try:
        spec = dict(orjson.loads(out)["data"][PLOT][0]["content"])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return f"_No loss plot: DVC returned no `{PLOT}` plot (has `dvc repro` written metrics/train_loss.csv?)_"
    spec.update(width=640, height=320)
    values = (spec.get("data") or {}).get("values")
    if isinstance(values, list):
        # val_loss exists only at eval steps; DVC's rows for the other steps carry "" as y, which Vega
        # would draw at 0. Leave them out so each curve joins its own points.
        spec["data"] = {**spec["data"], "values": [v for v in values if v.get("dvc_inferred_y_value") not in ("", None)]}
    try:
        import vl_convert
    except ImportError:
        return "_No loss plot: vl-convert-python is not installed (`make install`)_"
    with atomic_open(png) as fh:
        fh.write(vl_convert.vegalite_to_png(spec, scale=1.5))
    return f"![{PLOT}: loss and val_loss per optimizer step]({png.name})"


# -------------------------------------------------------------------------------------------------- report
def _decision_line(cwd: Path) -> str:
    p = cwd / GATE_DECISION
    if not p.is_file():
        return "**Gate: no decision yet** (run `dvc repro` or `make gate`)"
    d = orjson.loads(p.read_bytes())
    checks = d.get("checks") or {}
    failed = sorted(k for k, v in checks.items() if not v)
    verdict = "PROMOTE" if d.get("promote") else "BLOCK"
    tail = f"failed: {', '.join(f'`{k}`' for k in failed)}" if failed else "all checks pass"
    return f"**Gate: {verdict}** ({len(checks) - len(failed)}/{len(checks)} checks; {tail})"


def _section(title: str, rc_out: tuple[int, str], empty: str, fold: bool = False) -> list[str]:
    rc, out = rc_out
    if rc != 0:
        return [f"## {title}", "", f"_`dvc` failed: {out.splitlines()[-1] if out else 'no output'}_", ""]
    rows = out.count("\n") - 1  # header and rule lines; a header alone means nothing changed
    if rows < 1:
        return [f"## {title}", "", empty, ""]
    if fold:  # a long table collapsed, so that the PR comment opens on the decision
        return [f"## {title}", "", f"<details><summary>{rows} values changed</summary>", "", out, "", "</details>", ""]
    return [f"## {title}", "", out, ""]


def build(cwd: Path, base: str, out: Path) -> str:
    base_rev = resolve_base(base, cwd)
    diff_args = [base_rev] if base_rev else []
    against = f"`{base}`" if base_rev else "`HEAD` (last commit)"
    lines = ["# agent-flywheel review report", MARKER, "", _decision_line(cwd), ""]
    if base_rev is None:
        lines += [f"_Base branch `{base}` not found (nor `origin/{base}`): comparing with the last commit instead._", ""]
    gate_md = cwd / GATE_MD
    lines += ["## Gate", "", demote(gate_md.read_text(encoding="utf-8").strip()) if gate_md.is_file()
              else "_No data/gate/gate.md: run `dvc repro` first._", ""]
    lines += _section(f"Metrics vs {against}", _dvc(["metrics", "diff", *diff_args, "--md"], cwd),
                      "_No metric changed._", fold=True)
    lines += _section(f"Params vs {against}", _dvc(["params", "diff", *diff_args, "--md"], cwd),
                      "_No param changed._")
    params = yaml.safe_load((cwd / "params.yaml").read_text(encoding="utf-8")) or {}
    base_params_text = git_show(base_rev or "HEAD", Path("params.yaml"), cwd)
    changes = threshold_changes(yaml.safe_load(base_params_text) if base_params_text else None, params)
    if changes:
        lines += ["### Gate thresholds changed", "", *changes, ""]
    now_csv = cwd / BY_WORKFLOW
    lines += [f"## Exact match per workflow vs {against}", ""]
    if now_csv.is_file():
        lines += [workflow_table(now_csv.read_text(encoding="utf-8"), git_show(base_rev or "HEAD", BY_WORKFLOW, cwd)), ""]
    else:
        lines += ["_No metrics/eval_by_workflow.csv: run `dvc repro` first._", ""]
    lines += ["## Loss", "", loss_plot(cwd, base_rev, out.parent / f"{PLOT}.png"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="main", help="branch to compare with (default main; origin/<base> also tried)")
    ap.add_argument("--out", type=Path, default=Path("report/report.md"))
    args = ap.parse_args(argv)
    text = build(Path.cwd(), args.base, args.out)
    write_text(args.out, text)
    print(f"report: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
