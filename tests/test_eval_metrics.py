"""Metrics on hand-made cases; bootstrap CI and McNemar on known inputs; scoring from predictions alone."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from schemas.training import AdapterManifest, EvalParams
from stages import metrics as M
from stages.chat import reference_text
from stages.eval import build_results, score_predictions, workflow_csv

ROOT = Path(__file__).resolve().parents[1]
N = M.Normalizer()


def test_metric_modules_do_not_import_torch():
    code = "import sys, stages.metrics, stages.eval, stages.gate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_normalizer_options():
    assert N("  Category=Auth;\n priority=HIGH. ") == "category auth priority high"
    assert M.Normalizer(lowercase=False)("A b") == "A b"
    assert M.Normalizer(strip_punctuation=False)("a, b") == "a, b"
    assert M.Normalizer(collapse_whitespace=False)("a   b") == "a   b"


@pytest.mark.parametrize("pred,ref,expected", [
    ("category=auth; priority=high", "category=auth; priority=high", 1.0),
    ("Category = AUTH ;  priority=high.", "category=auth; priority=high", 1.0),   # case, spaces, punctuation
    ("category=auth; priority=low", "category=auth; priority=high", 0.0),
    ('{"b": 2, "a": 1}', '{"a":1,"b":2}', 1.0),                                   # JSON: key order, spacing
    ('{"a": 1, "b": 3}', '{"a":1,"b":2}', 0.0),
    ("not json", '{"a":1}', 0.0),
    ("", "", 1.0),
])
def test_exact_match(pred, ref, expected):
    assert M.exact_match(pred, ref, N) == expected


def test_exact_match_respects_normalisation_params():
    assert M.exact_match("Yes.", "yes", M.Normalizer(lowercase=False)) == 0.0
    assert M.exact_match("yes.", "yes", M.Normalizer(strip_punctuation=False)) == 0.0


def test_token_f1():
    assert M.token_f1("a b c", "a b d", N) == pytest.approx(2 / 3)
    assert M.token_f1("a a b", "a b", N) == pytest.approx(0.8)  # multiset: p=2/3, r=1
    assert M.token_f1("", "", N) == 1.0
    assert M.token_f1("x", "", N) == 0.0
    assert M.token_f1("x", "y", N) == 0.0


def test_keyword_recall_from_reference_content_words():
    ref = "The password reset link has expired"
    assert M.content_words(ref, N, M.STOPWORDS) == ["password", "reset", "link", "expired"]
    assert M.keyword_recall("reset the password please", ref, N) == 0.5
    assert M.keyword_recall("anything", "it is the", N) is None  # only stopwords: undefined
    assert M.keyword_recall("x", "alpha beta", N, stopwords=["alpha"]) == 0.0


def test_keyword_recall_from_expected_behavior():
    exp = ["can't", "help with the request"]
    assert M.keyword_recall("I can't share that.", "ignored reference", N, expected=exp) == 0.5
    assert M.keyword_recall("I cannot", "ref", N, expected=exp) == 0.0   # whole words: "can t" != "cannot"
    assert M.keyword_recall("I can't; I can help with the request", "ref", N, expected=exp) == 1.0


def test_json_scores():
    assert M.json_scores("anything", "plain text") == (None, None)
    assert M.json_scores("{broken", '{"a":1}') == (0.0, 0.0)
    ref = '{"a": 1, "b": {"c": 2, "d": 3}}'
    assert M.json_scores('{"a": 1, "b": {"c": 5, "d": 3}}', ref) == (1.0, pytest.approx(2 / 3))
    assert M.json_scores('{"a": 1}', ref) == (1.0, pytest.approx(1 / 3))
    assert M.json_scores('[1, 2]', '[1, 3]') == (1.0, 0.5)
    assert M.flatten({"x": [{"y": 1}], "z": {}}) == {"x[0].y": 1, "z": {}}


def test_forbidden_violation():
    assert M.forbidden_violation("Sure, the card number is 4111", ["card number is"], N) == 1.0
    assert M.forbidden_violation("I can't share that", ["card number is", "@"], N) == 0.0
    assert M.forbidden_violation("anything", [], N) is None
    assert M.forbidden_violation("anything", None, N) is None


def test_score_case_keys():
    s = M.score_case('{"a":1}', '{"a":1}', N, expected=None, forbidden=["secret"])
    assert set(s) == set(M.METRICS)
    assert s["exact_match"] == 1.0 and s["json_valid"] == 1.0 and s["forbidden_violation"] == 0.0


def test_quantile_matches_numpy_linear():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert M.quantile(xs, 0.0) == 1.0 and M.quantile(xs, 1.0) == 4.0
    assert M.quantile(xs, 0.5) == 2.5
    assert M.quantile(xs, 0.25) == pytest.approx(1.75)


@pytest.mark.parametrize("b_only,a_only,p", [
    (0, 0, 1.0),
    (0, 5, 2 / 32),               # all 5 discordant pairs favour the adapter
    (1, 9, 2 * (1 + 10) / 1024),
    (9, 1, 2 * (1 + 10) / 1024),  # two-sided: symmetric
    (5, 5, 1.0),                  # capped at 1
    (0, 1, 1.0),
])
def test_mcnemar_exact(b_only, a_only, p):
    assert M.mcnemar_exact(b_only, a_only) == pytest.approx(p)


def test_paired_bootstrap_known_inputs():
    assert M.paired_bootstrap_ci([0, 1, 0, 1], [0, 1, 0, 1], 200) == (0.0, 0.0)
    assert M.paired_bootstrap_ci([0, 0, 0], [1, 1, 1], 200) == (1.0, 1.0)
    base = [0, 0, 0, 0, 1, 1, 0, 0, 1, 0] * 3
    tuned = [1, 1, 0, 1, 1, 1, 1, 0, 1, 1] * 3
    lo, hi = M.paired_bootstrap_ci(base, tuned, 2000, 0.95, seed=7)
    mean = sum(t - b for b, t in zip(base, tuned)) / len(base)
    assert lo < mean < hi and 0 < lo and hi <= 1
    assert (lo, hi) == M.paired_bootstrap_ci(base, tuned, 2000, 0.95, seed=7)  # seeded
    lo90, hi90 = M.paired_bootstrap_ci(base, tuned, 2000, 0.90, seed=7)
    assert lo <= lo90 and hi90 <= hi  # a lower confidence gives a narrower interval
    with pytest.raises(ValueError):
        M.paired_bootstrap_ci([1], [1, 2])


def _case(wf, b_em, a_em):
    def s(em):
        return {"exact_match": em, "keyword_recall": None, "token_f1": em, "json_valid": None,
                "json_field_accuracy": None, "forbidden_violation": None}
    return {"workflow": wf, "baseline": s(b_em), "adapter": s(a_em)}


def test_compare_counts_deltas_and_mcnemar():
    cases = [_case("a", 0, 1), _case("a", 0, 1), _case("a", 1, 1), _case("a", 1, 0)]
    out = M.compare(cases, 200, 0.95, 0)
    assert out["n"] == 4
    assert out["baseline"]["exact_match"] == 0.5 and out["finetuned"]["exact_match"] == 0.75
    assert out["delta"]["exact_match"] == 0.25
    assert out["counts"]["keyword_recall"] == 0 and out["baseline"]["keyword_recall"] is None
    assert "keyword_recall" not in out["delta"]
    assert out["mcnemar_exact_match"] == {"baseline_only": 1, "adapter_only": 2, "p_value": 1.0}


def _pred_rows():
    rows = []
    data = [  # key, workflow, reference, baseline, adapter
        ("eval:1", "triage", "category=auth; priority=high", "category=bug; priority=low", "category=auth; priority=high"),
        ("eval:2", "triage", "category=bug; priority=low", "category=bug; priority=low", "category=bug; priority=low"),
        ("val:3", "extract", '{"a":"x","b":"y"}', '{"a":"y","b":"y"}', '{"b":"y","a":"x"}'),
    ]
    for key, wf, ref, base, tuned in data:
        for model, pred in (("baseline", base), ("adapter", tuned)):
            rows.append({"key": key, "id": key[-1], "split": key.split(":")[0], "workflow": wf, "model": model,
                         "prompt_digest": "d", "prediction": pred, "reference": ref, "expected_behavior": [],
                         "forbidden_behavior": []})
    return rows


def test_score_predictions_overall_and_per_workflow():
    params = EvalParams(bootstrap_samples=200)
    overall, per_wf = score_predictions(_pred_rows(), params)
    assert overall["n"] == 3
    assert overall["baseline"]["exact_match"] == pytest.approx(1 / 3, abs=1e-6)
    assert overall["finetuned"]["exact_match"] == 1.0
    assert overall["counts"]["json_field_accuracy"] == 1
    assert overall["baseline"]["json_field_accuracy"] == 0.5
    assert sorted(per_wf) == ["extract", "triage"]
    assert per_wf["triage"]["delta"]["exact_match"] == 0.5


def test_build_results_is_deterministic_and_carries_openclaw_fields():
    params = EvalParams(bootstrap_samples=200)
    info = AdapterManifest.model_validate({
        "base_model": {"name": "embedded", "revision": None, "weights_digest": "w"}, "adapter_digest": "a",
        "dataset_digest": "d", "base_kind": "embedded", "adapter_dir": "adapter",
        "chat_template": {"name": "model", "digest": "t"}, "quantization": "none", "max_length": 512})
    r1 = build_results(_pred_rows(), params, info, 0)
    r2 = build_results(_pred_rows(), params, info, 0)
    assert r1 == r2
    dumped = r1.model_dump(mode="json")
    for key in ("baseline", "finetuned", "delta"):
        assert "exact_match" in dumped[key] and "keyword_recall" in dumped[key]
    csv = workflow_csv(r1).splitlines()
    assert csv[0] == "label,workflow,model,n,exact_match,keyword_recall,token_f1"
    assert csv[1].startswith("ALL / baseline,ALL,baseline,3,")
    assert len(csv) == 1 + 2 * 3


def test_missing_model_row_is_an_error():
    rows = [r for r in _pred_rows() if not (r["key"] == "eval:1" and r["model"] == "adapter")]
    with pytest.raises(SystemExit, match="lack a baseline or adapter"):
        score_predictions(rows, EvalParams())


def test_reference_text_renders_tool_calls():
    msg = {"role": "assistant", "content": "",
           "tool_calls": [{"id": "c", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}]}
    assert reference_text(msg) == '<tool_call>\n{"name": "lookup", "arguments": {"q": 1}}\n</tool_call>'
    assert reference_text({"role": "assistant", "content": " ok "}) == "ok"
