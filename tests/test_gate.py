"""The gate at each threshold's edge. Every threshold is inclusive: exactly at the threshold passes."""
from __future__ import annotations

import json

import pytest

from model_fixture import dataset_manifest
from schemas.training import EvalParams, EvalResults, GateParams
from stages import gate

# The fields of openclaw-ft's gate_decision.example.json (rtivolle/openclaw-ft-main @ fd442f43), copied so that the
# test runs in a clean clone without ../shared.
OPENCLAW_FIELDS = {"timestamp_utc", "run_dir", "dataset_manifest", "eval_result", "thresholds", "checks",
                   "is_real_improvement", "promote"}
OPENCLAW_CHECKS = {"dataset_min_examples_ok", "dataset_redaction_ok", "exact_delta_ok", "keyword_recall_delta_ok"}
OPENCLAW_THRESHOLDS = {"min_delta_exact_match", "min_delta_keyword_recall"}

CLEAN_LEAKS = {"ok": True, "hits_total": 0, "hits_failing": 0, "hits": [], "files_scanned": 12, "ignored_detectors": []}
MANIFEST = {"build": {"min_example_ok": True, "redaction_ok": True}, "digest": "0123456789abcdef0123456789abcdef"}


def manifest_file() -> dict:
    """MANIFEST as a whole dataset_manifest.json: the stage reads the file through DatasetManifest."""
    return dataset_manifest(MANIFEST["build"], MANIFEST["digest"])


def leak_report_file() -> dict:
    """CLEAN_LEAKS as a whole leak_report.json (schemas.records.LeakReport: the stage reads it through that model)."""
    return {**CLEAN_LEAKS, "hits_listed": 0, "by_detector": {}, "by_file": {}, "skipped_binary": 0, "lines_scanned": 40,
            "bytes_scanned": 4000, "scanned": ["data"], "canaries": {"plain": 0, "sha256": 0}}


def decide(*args, **kw):
    """gate.decide with a clean leak report unless a test passes its own."""
    kw.setdefault("leaks", CLEAN_LEAKS)
    return gate.decide(*args, **kw)


def scores(em, kw=0.5):
    return {"exact_match": em, "keyword_recall": kw, "token_f1": em, "json_valid": None, "json_field_accuracy": None,
            "forbidden_violation_rate": None}


def comparison(n, b_em, a_em, ci_low=None, kw_delta=0.2, kw_low=None):
    d = round(a_em - b_em, 6)
    return {
        "n": n, "counts": {"exact_match": n, "keyword_recall": n},
        "baseline": scores(b_em, 0.5), "finetuned": scores(a_em, 0.5 + kw_delta),
        "delta": {"exact_match": d, "keyword_recall": kw_delta},
        "ci": {"exact_match": {"low": d if ci_low is None else ci_low, "high": d + 0.1},
               "keyword_recall": {"low": kw_delta if kw_low is None else kw_low, "high": kw_delta + 0.1}},
        "mcnemar_exact_match": {"baseline_only": 0, "adapter_only": 5, "p_value": 0.06},
    }


def results(n=100, b_em=0.2, a_em=0.6, ci_low=None, kw_delta=0.2, kw_low=None, workflows=None, dataset_digest=None):
    top = comparison(n, b_em, a_em, ci_low, kw_delta, kw_low)
    if workflows is None:
        workflows = {"triage": comparison(n, b_em, a_em)}
    return EvalResults.model_validate({
        **top, "per_workflow": workflows,
        "base_model": {"name": "embedded", "revision": None, "weights_digest": "w"}, "adapter_digest": "a",
        "dataset_digest": MANIFEST["digest"] if dataset_digest is None else dataset_digest,
        "predictions_digest": "p", "truncated_prompts": 0, "params": EvalParams().model_dump(),
    })


def test_decision_carries_every_openclaw_field():
    d = decide(results(), MANIFEST, GateParams(), run_dir="data", manifest_path="m.json", eval_path="e.json")
    dumped = d.model_dump(mode="json", by_alias=True)
    assert OPENCLAW_FIELDS <= set(dumped)
    assert OPENCLAW_CHECKS <= set(dumped["checks"])
    assert OPENCLAW_THRESHOLDS <= set(dumped["thresholds"])
    assert all(isinstance(v, bool) for v in dumped["checks"].values())
    assert set(dumped["check_details"]) == set(dumped["checks"])
    assert {"value", "threshold", "pass", "reason"} == set(dumped["check_details"]["exact_delta_ok"])
    assert dumped["promote"] is True and dumped["is_real_improvement"] is True and dumped["reasons"] == []
    assert dumped["timestamp_utc"] == "dataset-0123456789abcdef"  # a run label, not a clock
    assert dumped["run_dir"] == "data" and dumped["base_model"]["name"] == "embedded"


@pytest.mark.parametrize("ci_low,passes", [(0.05, True), (0.15 - 0.1, True), (0.0499, False), (0.2, True)])
def test_exact_delta_edge_on_ci_lower_bound(ci_low, passes):
    d = decide(results(ci_low=ci_low), MANIFEST, GateParams(min_delta_exact_match=0.05))
    assert d.checks["exact_delta_ok"] is passes
    assert d.promote is passes


def test_exact_delta_uses_mean_when_ci_not_required():
    r = results(b_em=0.2, a_em=0.25, ci_low=-0.1)  # delta exactly 0.05, CI low below
    assert decide(r, MANIFEST, GateParams(require_ci_lower_bound=False)).checks["exact_delta_ok"] is True
    assert decide(r, MANIFEST, GateParams(require_ci_lower_bound=True)).checks["exact_delta_ok"] is False
    r = results(b_em=0.2, a_em=0.2499)
    assert decide(r, MANIFEST, GateParams(require_ci_lower_bound=False)).checks["exact_delta_ok"] is False


@pytest.mark.parametrize("kw_low,passes", [(0.1, True), (0.0999, False)])
def test_keyword_recall_edge(kw_low, passes):
    d = decide(results(kw_low=kw_low), MANIFEST, GateParams(min_delta_keyword_recall=0.1))
    assert d.checks["keyword_recall_delta_ok"] is passes
    assert d.is_real_improvement is passes


def test_keyword_recall_undefined_fails_closed():
    r = results()
    r.delta.pop("keyword_recall")
    r.ci.pop("keyword_recall")
    d = decide(r, MANIFEST, GateParams())
    assert d.checks["keyword_recall_delta_ok"] is False
    assert "no held-out case" in d.check_details["keyword_recall_delta_ok"].reason


@pytest.mark.parametrize("n,passes", [(50, True), (49, False)])
def test_min_eval_examples_edge(n, passes):
    d = decide(results(n=n), MANIFEST, GateParams(min_eval_examples=50))
    assert d.checks["min_eval_examples_ok"] is passes


@pytest.mark.parametrize("adapter_em,passes", [(0.5, True), (0.45, True), (0.4499, False)])
def test_workflow_regression_edge(adapter_em, passes):
    wfs = {"good": comparison(40, 0.1, 0.9), "bad": comparison(10, 0.5, adapter_em)}
    d = decide(results(workflows=wfs), MANIFEST, GateParams(max_workflow_regression=0.05))
    assert d.checks["workflow_regression_ok"] is passes
    if not passes:
        assert "bad" in d.check_details["workflow_regression_ok"].reason


def test_small_workflows_are_reported_not_gated():
    wfs = {"good": comparison(40, 0.1, 0.9), "tiny": comparison(4, 1.0, 0.0)}
    d = decide(results(workflows=wfs), MANIFEST, GateParams(min_workflow_examples=5))
    assert d.checks["workflow_regression_ok"] is True
    assert "tiny" in d.check_details["workflow_regression_ok"].reason
    d = decide(results(workflows=wfs), MANIFEST, GateParams(min_workflow_examples=4))
    assert d.checks["workflow_regression_ok"] is False


@pytest.mark.parametrize("key,check,param", [("min_example_ok", "dataset_min_examples_ok", "require_min_example_ok"),
                                             ("redaction_ok", "dataset_redaction_ok", "require_redaction_ok")])
def test_dataset_flags(key, check, param):
    bad = {"build": {**MANIFEST["build"], key: False}, "digest": MANIFEST["digest"]}
    d = decide(results(), bad, GateParams())
    assert d.checks[check] is False
    assert d.is_real_improvement is True and d.promote is False  # measured better, still not promoted
    assert any(r.startswith(check) for r in d.reasons)
    d = decide(results(), bad, GateParams(**{param: False}))
    assert d.checks[check] is True and d.promote is True
    missing = {"build": {}, "digest": MANIFEST["digest"]}
    assert decide(results(), missing, GateParams()).checks[check] is False  # absent is not true


def test_adapter_from_another_dataset_is_not_promoted():
    d = decide(results(dataset_digest="other"), MANIFEST, GateParams())
    assert d.checks["inputs_consistent_ok"] is False and d.promote is False


def test_cli_writes_deterministic_decision_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("gate:\n  min_delta_exact_match: 0.3\nredact: {}\n")
    (tmp_path / "data" / "eval").mkdir(parents=True)
    (tmp_path / "data" / "eval" / "eval_results.json").write_text(results().model_dump_json())
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    (tmp_path / "leaks.json").write_text(json.dumps(CLEAN_LEAKS))
    argv = ["--params", "params.yaml", "--eval-results", "data/eval/eval_results.json", "--manifest",
            "manifest.json", "--leaks", "leaks.json", "--out", "data/gate"]
    with pytest.raises(ValueError, match="manifest.json: not a valid DatasetManifest"):  # read through its model
        gate.main(argv)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_file()))
    with pytest.raises(ValueError, match="leaks.json: not a valid LeakReport"):  # so is the leak report
        gate.main(argv)
    (tmp_path / "leaks.json").write_text(json.dumps(leak_report_file()))
    gate.main(argv)
    first = (tmp_path / "data/gate/gate_decision.json").read_bytes()
    gate.main(argv)
    assert (tmp_path / "data/gate/gate_decision.json").read_bytes() == first
    out = json.loads(first)
    assert out["thresholds"]["min_delta_exact_match"] == 0.3
    assert out["eval_result"] == "data/eval/eval_results.json" and out["dataset_manifest"] == "manifest.json"
    assert set(out["input_digests"]) == {"eval_results", "dataset_manifest", "dataset", "predictions", "leak_report"}
    assert out["promote"] is True
    md = (tmp_path / "data/gate/gate.md").read_text()
    assert md.startswith("## Adapter gate: PROMOTE")
    assert "| exact_delta_ok |" in md and "| triage | 100 |" in md
    assert capsys.readouterr().out.count("\n") == 2  # one summary line per run

    (tmp_path / "strict.yaml").write_text("gate:\n  min_delta_exact_match: 0.9\nredact: {}\n")
    strict = ["--params", "strict.yaml"] + argv[2:-1] + ["data/gate_strict"]
    gate.main(strict)  # a rejection is a result, not a failure...
    assert json.loads((tmp_path / "data/gate_strict/gate_decision.json").read_bytes())["promote"] is False
    with pytest.raises(SystemExit) as exc:  # ...unless CI asks for one
        gate.main(strict + ["--fail-on-reject"])
    assert exc.value.code == gate.BLOCKED == 3
    capsys.readouterr()
    for folder, code in (("data/gate", 0), ("data/gate_strict", 3)):  # `make gate`
        with pytest.raises(SystemExit) as exc:
            gate.main(["--print-decision", f"{folder}/gate_decision.json"])
        assert exc.value.code == code
    printed = capsys.readouterr().out
    assert printed.startswith("PROMOTE: adapter a on base embedded") and "BLOCK: adapter" in printed
    assert "[FAIL] exact_delta_ok" in printed
    with pytest.raises(SystemExit) as exc:
        gate.main(["--params", "params.yaml"])
    assert exc.value.code == 2  # argparse usage error naming the missing flags
