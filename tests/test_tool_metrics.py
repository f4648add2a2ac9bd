"""Tool calls scored as calls (BFCL-style AST checks), per workflow with CIs, and the gate's tool-call check."""
from __future__ import annotations

import pytest

from schemas.training import AdapterManifest, EvalParams, GateParams
from stages import gate
from stages import metrics as M
from stages.chat import render_tool_call
from stages.eval import build_results, score_predictions
from test_gate import CLEAN_LEAKS, MANIFEST

W = render_tool_call  # the one text format a model is trained to write (stages/chat.py)
REF = W("get_weather", {"city": "Lisbon", "unit": "c"})
TWO = W("convert", {"amount": 100, "to": "EUR"}) + "\n" + W("convert", {"amount": 100, "to": "GBP"})


@pytest.mark.parametrize("pred,ref,want", [
    (REF, REF, (1.0, 1.0, 1.0, 1.0)),
    ('<tool_call>\n{"arguments": {"unit": "c", "city": "Lisbon"}, "name": "get_weather"}\n</tool_call>', REF,
     (1.0, 1.0, 1.0, 1.0)),                                                     # key order does not matter
    (W("get_weather", '{"city": "Lisbon", "unit": "c"}'), REF, (1.0, 1.0, 1.0, 1.0)),  # arguments as a JSON string
    (W("convert", {"amount": 100.0, "to": "GBP"}) + W("convert", {"amount": 100, "to": "EUR"}), TWO,
     (1.0, 1.0, 1.0, 1.0)),                                                     # 100.0 == 100; parallel in any order
    (W("get_weather", {"city": "Porto", "unit": "c"}), REF, (0.0, 1.0, 0.5, 1.0)),  # one of two arguments right
    (W("get_time", {"city": "Lisbon", "unit": "c"}), REF, (0.0, 0.0, 0.0, 1.0)),  # wrong function: no argument credit
    (REF + W("get_time", {"tz": "WET"}), REF, (0.0, 0.5, 0.8, 1.0)),             # an extra call costs
    ("<tool_call>\n{not json}\n</tool_call>", REF, (0.0, 0.0, 0.0, 0.0)),      # a block that does not parse
    ("It is sunny in Lisbon.", REF, (0.0, 0.0, 0.0, 0.0)),                      # no call at all where one was expected
])
def test_tool_call_scores(pred, ref, want):
    s = M.tool_call_scores(pred, ref)
    got = tuple(s[m] for m in ("tool_call_accuracy", "tool_name_accuracy", "tool_args_f1", "tool_call_parse_rate"))
    assert got == pytest.approx(want)


def test_cases_without_tool_calls_are_not_counted():
    assert M.tool_call_scores(REF, "a plain answer") == dict.fromkeys(M.TOOL_METRICS)
    s = M.score_case("a plain answer", "a plain answer", M.Normalizer())
    assert all(s[m] is None for m in M.TOOL_METRICS) and s["exact_match"] == 1.0


def _rows(spec):
    rows = []
    for key, wf, ref, base, tuned in spec:
        for model, pred in (("baseline", base), ("adapter", tuned)):
            rows.append({"key": key, "id": key, "split": "eval", "workflow": wf, "model": model, "prompt_digest": "d",
                         "prediction": pred, "reference": ref, "expected_behavior": [], "forbidden_behavior": []})
    return rows


SPEC = ([(f"c{i}", "agent", REF, "It is sunny.", REF) for i in range(6)]
        + [(f"t{i}", "chat", "hello there", "hello there", "hi") for i in range(6)])


def test_per_workflow_tool_metrics_with_paired_bootstrap_cis():
    overall, per_wf = score_predictions(_rows(SPEC), EvalParams(bootstrap_samples=200))
    assert overall["counts"]["tool_call_accuracy"] == 6 and overall["delta"]["tool_call_accuracy"] == 1.0
    agent, chat = per_wf["agent"], per_wf["chat"]
    assert agent["baseline"]["tool_call_accuracy"] == 0.0 and agent["finetuned"]["tool_call_accuracy"] == 1.0
    assert agent["ci"]["tool_call_accuracy"] == {"low": 1.0, "high": 1.0}
    assert agent["counts"]["tool_call_parse_rate"] == 6 and agent["delta"]["tool_call_parse_rate"] == 1.0
    assert chat["counts"]["tool_call_accuracy"] == 0 and chat["finetuned"]["tool_call_accuracy"] is None
    assert "tool_call_accuracy" not in chat["delta"]


INFO = AdapterManifest.model_validate({  # data/train/model.json, as eval reads it
    "base_model": {"name": "embedded", "revision": None, "weights_digest": "w"}, "adapter_digest": "a",
    "dataset_digest": MANIFEST["digest"], "base_kind": "embedded", "adapter_dir": "adapter",
    "chat_template": {"name": "model", "digest": "t"}, "quantization": "none", "max_length": 512})


def _decide(spec, **params):
    res = build_results(_rows(spec), EvalParams(bootstrap_samples=200), INFO, 0)
    return gate.decide(res, MANIFEST, GateParams(min_eval_examples=0, **params), leaks=CLEAN_LEAKS), res


def test_gate_blocks_a_workflow_that_regresses_on_tool_calls():
    worse = [(f"c{i}", "agent", REF, REF, REF if i < 3 else "sunny") for i in range(6)]
    d, res = _decide(worse + SPEC[6:])
    detail = d.check_details["tool_call_accuracy_ok"]
    assert not detail.passed and detail.value == -0.5 and "in agent, 6 cases" in detail.reason
    assert not d.checks["tool_call_accuracy_ok"] and not d.is_real_improvement
    # the floor is a param, not a constant: allow a drop of 0.5 and the check passes
    d, _ = _decide(worse + SPEC[6:], min_delta_tool_call_accuracy=-0.5)
    assert d.checks["tool_call_accuracy_ok"]
    assert "### Tool calls per workflow" in gate.report(d, res) and "| agent | 6 |" in gate.report(d, res)


def test_gate_with_no_or_few_tool_call_cases_passes_and_says_so():
    d, res = _decide(SPEC[6:])
    detail = d.check_details["tool_call_accuracy_ok"]
    assert detail.passed and detail.value is None and detail.reason.startswith("no held-out case makes a tool call")
    assert "No held-out case makes a tool call" in gate.report(d, res)
    few = [(f"c{i}", "agent", REF, REF, "sunny") for i in range(3)]
    d, _ = _decide(few + SPEC[6:])
    detail = d.check_details["tool_call_accuracy_ok"]
    assert detail.passed and "only 3 held-out tool-call cases" in detail.reason and "agent (3)" in detail.reason
