"""gate: decide whether the adapter is promoted, from eval_results.json, the dataset manifest and gate.* params only.

    python -m stages.gate --params params.yaml --eval-results data/eval/eval_results.json \
        --manifest data/build_dataset/dataset_manifest.json --leaks data/leaks/leak_report.json --out data/gate

Nothing here loads a model, so `dvc exp run -S gate.min_delta_exact_match=0.3` reruns this stage alone.

Every threshold is inclusive, with a 1e-9 tolerance for floating point: a value exactly at a minimum passes
(delta >= min_delta_*, n >= min_eval_examples), and a regression exactly at the maximum passes
(baseline - adapter <= max_workflow_regression). With require_ci_lower_bound, the delta's CI lower bound must
clear the minimum, not only its mean.

The decision carries every field of openclaw-ft's gate_decision.json. `timestamp_utc` is a deterministic run label
derived from the dataset digest (no wall clock: the same inputs give the same bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from schemas.params import RedactParams
from schemas.records import DatasetManifest, LeakReport
from schemas.training import EvalResults, GateDecision, GateParams
from stages.core import content_id, load_params, read_model, write_json, write_text
from stages.scanning import canaries_from, redactor_from, scan_text, strings

EPS = 1e-9
DATA_CHECKS = ("dataset_min_examples_ok", "dataset_redaction_ok", "leak_scan_ok")
IMPROVEMENT_CHECKS = ("exact_delta_ok", "keyword_recall_delta_ok", "min_eval_examples_ok", "workflow_regression_ok",
                      "tool_call_accuracy_ok", "inputs_consistent_ok")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _detail(value: Any, threshold: Any, passed: bool, reason: str) -> dict:
    return {"value": value, "threshold": threshold, "pass": bool(passed), "reason": reason}


def _flag_check(build: dict, key: str, required: bool) -> dict:
    value = build.get(key)
    shown = json.dumps(value)
    if not required:
        return _detail(value, False, True, f"not required (manifest build.{key} is {shown})")
    ok = value is True
    return _detail(value, True, ok, f"manifest build.{key} is {shown}" + ("" if ok else ": must be true"))


def _delta_check(res: EvalResults, metric: str, threshold: float, use_ci: bool) -> dict:
    delta = res.delta.get(metric)
    ci = res.ci.get(metric)
    if delta is None or ci is None:
        return _detail(None, threshold, False, f"no held-out case defines {metric}")
    value = ci.low if use_ci else delta
    ok = value >= threshold - EPS
    what = "CI lower bound" if use_ci else "delta"
    return _detail(value, threshold, ok, f"delta {_fmt(delta)} (CI {_fmt(ci.low)}..{_fmt(ci.high)}); {what} "
                   f"{_fmt(value)} {'>=' if ok else '<'} {threshold}")


def _regression_check(res: EvalResults, params: GateParams) -> dict:
    worst, worst_wf, skipped = None, None, []
    for wf, comp in sorted(res.per_workflow.items()):
        if comp.n < params.min_workflow_examples:
            skipped.append(wf)
            continue
        drop = round(comp.baseline.exact_match - comp.finetuned.exact_match, 9)
        if worst is None or drop > worst:
            worst, worst_wf = drop, wf
    note = f"; not gated (< {params.min_workflow_examples} cases): {', '.join(skipped)}" if skipped else ""
    if worst is None:
        return _detail(None, params.max_workflow_regression, True, "no workflow has enough cases to gate" + note)
    ok = worst <= params.max_workflow_regression + EPS
    if worst <= 0:
        reason = f"no workflow regressed (smallest exact-match gain {0.0 - worst + 0.0:+.3f}, in {worst_wf})"
    else:
        reason = (f"largest exact-match drop {worst:.3f} (in {worst_wf}) {'<=' if ok else '>'} "
                  f"{params.max_workflow_regression}")
    return _detail(worst, params.max_workflow_regression, ok, reason + note)


def _tool_call_check(res: EvalResults, params: GateParams) -> dict:
    """No regression in tool-call accuracy: overall and in every workflow with at least min_workflow_examples
    cases whose reference makes tool calls, the delta (adapter - baseline, the mean) must be at least
    min_delta_tool_call_accuracy. Cases without tool calls don't count; with too few tool-call cases anywhere
    the check passes and says so (nothing to gate on is not a regression), and gate.md shows the figures."""
    metric, need, floor = "tool_call_accuracy", params.min_workflow_examples, params.min_delta_tool_call_accuracy
    groups = [("all workflows", res.counts.get(metric, 0), res.delta.get(metric))] + [
        (wf, c.counts.get(metric, 0), c.delta.get(metric)) for wf, c in sorted(res.per_workflow.items())]
    gated = [(name, n, d) for name, n, d in groups if n >= need and d is not None]
    skipped = [f"{name} ({n})" for name, n, d in groups[1:] if 0 < n < need]
    note = f"; not gated (< {need} tool-call cases): {', '.join(skipped)}" if skipped else ""
    if not gated:
        total = res.counts.get(metric, 0)
        why = "no held-out case makes a tool call" if total == 0 else f"only {total} held-out tool-call cases"
        return _detail(None, floor, True, f"{why}: not gated{note}")
    worst = min(gated, key=lambda g: (round(g[2], 9), g[0]))
    ok = worst[2] >= floor - EPS
    return _detail(worst[2], floor, ok, f"smallest tool-call accuracy delta {_fmt(worst[2])} (in {worst[0]}, "
                   f"{worst[1]} cases) {'>=' if ok else '<'} {floor}{note}")


def _where(hits: list[dict], limit: int = 5) -> str:
    shown = ", ".join(f"{h['file']}:{h['line']} ({h['detector']})" for h in hits[:limit])
    return shown + (f" and {len(hits) - limit} more" if len(hits) > limit else "")


def _leak_check(report: LeakReport | dict | None, self_hits: list[dict], required: bool) -> dict:
    """Any detector or canary hit in an artifact, or in the gate's own report, blocks; the reason names
    where (file, line, detector), never what. (A plain dict is a partial report, as tests pass.)"""
    leaks = report.model_dump() if isinstance(report, LeakReport) else report
    if leaks is None:
        return _detail(None, 0, not required, "no leak report" + ("" if required else " (not required)"))
    ignored = set(leaks.get("ignored_detectors") or [])
    listed = [h for h in leaks.get("hits", []) if h["detector"] not in ignored] + self_hits
    n = int(leaks.get("hits_failing", 0)) + len(self_hits)
    if n == 0:
        note = f" ({leaks['hits_total']} hits of ignored detectors)" if leaks.get("hits_total") else ""
        return _detail(0, 0, True, f"no detector or canary hit in {leaks.get('files_scanned', 0)} artifacts{note}")
    reason = f"{n} leak-scan hits: {_where(listed)}; see data/leaks/leak_report.json"
    if not required:
        return _detail(n, 0, True, "not required; " + reason)
    return _detail(n, 0, False, reason)


def _manifest_flags(manifest: DatasetManifest | dict) -> tuple[dict, str | None]:
    """(the manifest's build section, its dataset digest): from the model the stage reads, or from a plain
    dict (a partial manifest, as tests and callers outside the pipeline pass)."""
    if isinstance(manifest, DatasetManifest):
        return manifest.build.model_dump(), manifest.digest
    return manifest.get("build") or {}, manifest.get("digest")


def decide(eval_results: EvalResults | dict, manifest: DatasetManifest | dict, params: GateParams, *, run_dir: str = "",
           manifest_path: str = "", eval_path: str = "", input_digests: dict[str, str] | None = None,
           leaks: LeakReport | dict | None = None, self_hits: list[dict] | None = None) -> GateDecision:
    """The gate decision; pure (the paths and digests are only recorded)."""
    res = eval_results if isinstance(eval_results, EvalResults) else EvalResults.model_validate(eval_results)
    build, digest = _manifest_flags(manifest)
    details = {
        "dataset_min_examples_ok": _flag_check(build, "min_example_ok", params.require_min_example_ok),
        "dataset_redaction_ok": _flag_check(build, "redaction_ok", params.require_redaction_ok),
        "leak_scan_ok": _leak_check(leaks, self_hits or [], params.require_leak_scan_ok),
        "exact_delta_ok": _delta_check(res, "exact_match", params.min_delta_exact_match, params.require_ci_lower_bound),
        "keyword_recall_delta_ok": _delta_check(res, "keyword_recall", params.min_delta_keyword_recall,
                                                params.require_ci_lower_bound),
        "min_eval_examples_ok": _detail(res.n, params.min_eval_examples, res.n >= params.min_eval_examples,
                                        f"{res.n} held-out cases {'>=' if res.n >= params.min_eval_examples else '<'} "
                                        f"{params.min_eval_examples}"),
        "workflow_regression_ok": _regression_check(res, params),
        "tool_call_accuracy_ok": _tool_call_check(res, params),
        "inputs_consistent_ok": _detail(
            res.dataset_digest, digest, bool(digest) and res.dataset_digest == digest,
            "the adapter was trained on this manifest's dataset" if digest and res.dataset_digest == digest else
            f"dataset digest of the evaluated adapter ({res.dataset_digest}) != manifest digest ({digest}): rerun "
            "train and eval"),
    }
    checks = {k: d["pass"] for k, d in details.items()}
    improvement = all(checks[k] for k in IMPROVEMENT_CHECKS)
    promote = improvement and all(checks[k] for k in DATA_CHECKS)
    return GateDecision(
        timestamp_utc=f"dataset-{(digest or 'unknown')[:16]}",
        run_dir=run_dir, dataset_manifest=manifest_path, eval_result=eval_path,
        thresholds=params.model_dump(mode="json"), checks=checks, is_real_improvement=improvement, promote=promote,
        check_details=details, input_digests=input_digests or {}, base_model=res.base_model,
        adapter_digest=res.adapter_digest, reasons=[f"{k}: {d['reason']}" for k, d in details.items() if not d["pass"]],
    )


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def report(decision: GateDecision, res: EvalResults) -> str:
    """Markdown a reviewer can paste into a PR."""
    conf = f"{res.params.confidence:.0%}"
    verdict = "PROMOTE" if decision.promote else "DO NOT PROMOTE"
    b = decision.base_model
    lines = [
        f"## Adapter gate: {verdict}",
        "",
        f"Adapter `{decision.adapter_digest}` on base `{b.name}`"
        + (f" @ `{b.revision}`" if b.revision else "")
        + (f" (weights `{b.weights_digest}`)" if b.weights_digest else "")
        + f"; dataset `{res.dataset_digest}`; {res.n} held-out cases; run `{decision.timestamp_utc}`.",
        "",
        "| check | value | threshold | pass | reason |",
        "|---|---|---|---|---|",
    ]
    for name, d in decision.check_details.items():
        lines.append(f"| {name} | {_cell(d.value)} | {_cell(d.threshold)} | {'yes' if d.passed else '**no**'} | "
                     f"{d.reason.replace('|', '/')} |")
    lines += ["", f"### Overall (adapter - baseline, paired bootstrap {conf} CI)", "",
              "| metric | n | baseline | adapter | delta | CI |", "|---|---|---|---|---|---|"]
    for metric, n in res.counts.items():
        ci = res.ci.get(metric)
        lines.append(f"| {metric} | {n} | {_cell(getattr(res.baseline, metric))} | "
                     f"{_cell(getattr(res.finetuned, metric))} | {_fmt(res.delta.get(metric))} | "
                     + (f"{_fmt(ci.low)}..{_fmt(ci.high)}" if ci else "n/a") + " |")
    mc = res.mcnemar_exact_match
    lines += ["", f"Exact match, McNemar exact test: adapter-only right {mc.adapter_only}, baseline-only right "
              f"{mc.baseline_only}, p = {mc.p_value:.3g}.", "",
              f"### Per workflow, exact match ({conf} CI)", "",
              "| workflow | n | baseline | adapter | delta | CI | McNemar p |", "|---|---|---|---|---|---|---|"]
    for wf, c in sorted(res.per_workflow.items()):
        ci = c.ci.get("exact_match")
        lines.append(f"| {wf} | {c.n} | {_cell(c.baseline.exact_match)} | {_cell(c.finetuned.exact_match)} | "
                     f"{_fmt(c.delta.get('exact_match'))} | " + (f"{_fmt(ci.low)}..{_fmt(ci.high)}" if ci else "n/a")
                     + f" | {c.mcnemar_exact_match.p_value:.3g} |")
    lines += _tool_call_table(res, conf, decision.thresholds.get("min_workflow_examples"))
    lines.append("")
    return "\n".join(lines)


_TOOL_COLUMNS = ("tool_call_accuracy", "tool_name_accuracy", "tool_args_f1", "tool_call_parse_rate")


def _tool_call_table(res: EvalResults, conf: str, min_cases: Any) -> list[str]:
    """Per workflow, the tool-call metrics (adapter, and delta with its CI), over the cases that make calls."""
    if not res.counts.get("tool_call_accuracy"):
        return ["", "### Tool calls", "", "No held-out case makes a tool call: the tool-call metrics are not defined, and "
                "`tool_call_accuracy_ok` passes without gating (there is nothing to regress on)."]
    lines = ["", f"### Tool calls per workflow (adapter, delta and {conf} CI; cases whose reference makes calls)", "",
             f"Cases without a tool call are not counted; a workflow with fewer than {min_cases} tool-call cases is "
             "shown but not gated.", "",
             "| workflow | n | " + " | ".join(_TOOL_COLUMNS) + " |", "|---|---|" + "---|" * len(_TOOL_COLUMNS)]
    groups = [("ALL", res.counts, res.finetuned, res.delta, res.ci)] + [
        (wf, c.counts, c.finetuned, c.delta, c.ci) for wf, c in sorted(res.per_workflow.items())]
    for wf, counts, tuned, delta, ci in groups:
        if not counts.get("tool_call_accuracy"):
            continue
        cells = []
        for m in _TOOL_COLUMNS:
            iv = ci.get(m)
            cells.append(f"{_cell(getattr(tuned, m))} ({_fmt(delta.get(m))}"
                         + (f", {_fmt(iv.low)}..{_fmt(iv.high)})" if iv else ")"))
        lines.append(f"| {wf} | {counts['tool_call_accuracy']} | " + " | ".join(cells) + " |")
    return lines


def _withhold(obj: Any, hit: Any) -> Any:
    """Replace every string the leak scan flags; the marker names the detector only."""
    if isinstance(obj, str):
        found = hit(obj)
        return f"[withheld by the leak scan: {', '.join(sorted(found))}]" if found else obj
    if isinstance(obj, dict):
        return {(_withhold(k, hit) if isinstance(k, str) else k): _withhold(v, hit) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_withhold(v, hit) for v in obj]
    return obj


def self_scan(decision: dict, markdown: str, hit: Any, out_name: str) -> tuple[list[dict], dict, str]:
    """The gate's own outputs go through the same scan before they are written. Returns the hits
    (file, line, detector) and both outputs with any flagged string or line withheld."""
    hits = []
    for s in strings(decision):
        hits += [{"file": f"{out_name}/gate_decision.json", "line": 0, "detector": d} for d in sorted(hit(s))]
    lines = markdown.split("\n")
    for i, line in enumerate(lines):
        found = hit(line)
        if found:
            hits += [{"file": f"{out_name}/gate.md", "line": i + 1, "detector": d} for d in sorted(found)]
            lines[i] = f"[line withheld by the leak scan: {', '.join(sorted(found))}]"
    return sorted(hits, key=lambda h: (h["file"], h["line"], h["detector"])), _withhold(decision, hit), "\n".join(lines)


def _rel(path: str) -> str:
    return Path(os.path.relpath(path)).as_posix()


BLOCKED = 3  # exit status of --print-decision / --fail-on-reject when the adapter is not promoted


def print_decision(path: str) -> int:
    """Print a stored decision; 0 when it promotes, 3 when it blocks (for `make gate` and CI)."""
    d = read_model(path, GateDecision)
    print(f"{'PROMOTE' if d.promote else 'BLOCK'}: adapter {d.adapter_digest} on base {d.base_model.name} "
          f"({d.timestamp_utc})")
    for name, detail in d.check_details.items():
        print(f"  [{'pass' if detail.passed else 'FAIL'}] {name}: {detail.reason}")
    return 0 if d.promote else BLOCKED


def run(a: argparse.Namespace) -> GateDecision:
    """The stage: decide, scan its own outputs (withholding any flagged text), write both."""
    params = load_params(a.params, "gate", GateParams)
    res = read_model(a.eval_results, EvalResults)
    manifest = read_model(a.manifest, DatasetManifest)
    rp = load_params(a.params, "redact", RedactParams)
    redactor, canaries = redactor_from(rp), canaries_from(rp)

    def hit(text: str) -> set[str]:
        return scan_text(text, redactor, canaries)

    digests = {"eval_results": content_id(Path(a.eval_results).read_bytes()),
               "dataset_manifest": content_id(Path(a.manifest).read_bytes()),
               "leak_report": content_id(Path(a.leaks).read_bytes()),
               "dataset": str(manifest.digest), "predictions": res.predictions_digest}
    kw = dict(run_dir=_rel(str(Path(a.out).parent)), manifest_path=_rel(a.manifest), eval_path=_rel(a.eval_results),
              input_digests=digests, leaks=read_model(a.leaks, LeakReport))
    decision = decide(res, manifest, params, **kw)
    hits, _, _ = self_scan(decision.model_dump(mode="json", by_alias=True), report(decision, res), hit, _rel(a.out))
    if hits:  # decide again so that the block and its reason are in the outputs, then withhold the flagged text
        decision = decide(res, manifest, params, **kw, self_hits=hits)
    _, dec_json, md = self_scan(decision.model_dump(mode="json", by_alias=True), report(decision, res), hit, _rel(a.out))
    write_json(Path(a.out) / "gate_decision.json", dec_json)
    write_text(Path(a.out) / "gate.md", md)
    failed = [k for k, v in decision.checks.items() if not v]
    print(f"gate: {'PROMOTE' if decision.promote else 'do not promote'} (exact-match delta "
          f"{_fmt(res.delta.get('exact_match'))}, {len(decision.checks) - len(failed)}/{len(decision.checks)} checks "
          f"pass{'' if not failed else '; failed: ' + ', '.join(failed)}) -> {a.out}/gate_decision.json")
    return decision


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.gate", description=__doc__.split("\n")[0])
    for name in ("params", "eval-results", "manifest"):
        ap.add_argument(f"--{name}")
    ap.add_argument("--leaks", help="leak_report.json of the leaks stage")
    ap.add_argument("--out", help="folder for gate_decision.json and gate.md")
    ap.add_argument("--fail-on-reject", action="store_true", help=f"exit {BLOCKED} when the adapter is not promoted")
    ap.add_argument("--print-decision", metavar="GATE_DECISION_JSON",
                    help=f"only print a stored decision; exit 0 on promote, {BLOCKED} on block")
    a = ap.parse_args(argv)
    if a.print_decision:
        sys.exit(print_decision(a.print_decision))
    missing = [f"--{k.replace('_', '-')}" for k in ("params", "eval_results", "manifest", "leaks", "out")
               if not getattr(a, k)]
    if missing:
        ap.error(f"the stage needs {', '.join(missing)}")
    if not run(a).promote and a.fail_on_reject:
        sys.exit(BLOCKED)

if __name__ == "__main__":
    main()
