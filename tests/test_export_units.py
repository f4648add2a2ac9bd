"""export's pure pieces: readiness tiers, rule support, eval hold-out, safe names; and ingest."""
from __future__ import annotations

from collections import Counter

from schemas.params import ExportParams
from stages import export
from stages.core import safe_name
from stages.ingest import ingest


def test_readiness_tiers_next_tier_and_missing():
    p = ExportParams()
    r = export.readiness(9, 0, p)
    assert r["tier"] == "none" and r["next_tier"] == "context_card" and r["missing_for_next"] == 1
    r = export.readiness(100, 0, p)
    assert r["tier"] == "measurement" and r["next_tier"] == "adapter_candidate" and r["missing_for_next"] == 400
    r = export.readiness(12000, 10, p)  # enough approved runs, too few negatives for the last tier
    assert r["tier"] == "adapter" and r["next_tier"] == "adapter_with_negatives" and r["missing_for_next"] == 990
    r = export.readiness(12000, 1000, p)
    assert r["tier"] == "adapter_with_negatives" and r["next_tier"] is None and r["missing_for_next"] == 0


def test_rules_need_support():
    wf = export._Workflow("d", "w", approved=10)
    wf.rules = Counter({"often": 5, "rare": 2, "edge": 3})
    card = export.context_card(wf, ExportParams(min_rule_support=3))
    assert card["stable_rules"] == ["often", "edge"]
    assert card["version"] == export.context_card(wf, ExportParams(min_rule_support=3))["version"]


def _trace(prompt: str, trainable=True, outcome="success"):
    return {"trainable": trainable, "outcome": outcome, "domain": "d", "workflow": "w",
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "a"}]}


def test_eval_holdout_is_a_hash_share_keyed_on_the_prompt():
    p = ExportParams(eval_share=0.2)
    picks = [export.is_eval(_trace(f"prompt number {i}"), p) for i in range(2000)]
    assert 0.17 < sum(picks) / len(picks) < 0.23
    # the same prompt, spaced or cased differently, falls on the same side
    assert export.is_eval(_trace("Prompt  NUMBER 7"), p) == export.is_eval(_trace("prompt number 7"), p)
    assert not any(export.is_eval(_trace(f"prompt number {i}", trainable=False), p) for i in range(200))
    assert not any(export.is_eval(_trace(f"prompt number {i}", outcome="failed"), p) for i in range(200))


def test_safe_name_never_escapes():
    for bad in ["../x", "..", "/etc/passwd", "a/b", "", ".", "x\x00y", "C:\\Windows"]:
        s = safe_name(bad)
        assert s and "/" not in s and "\\" not in s and s not in (".", "..") and not s.startswith(".")
    assert safe_name("../x") != safe_name("x")
    assert safe_name("lead_intake") == "lead_intake"


def test_ingest_is_content_addressed_and_idempotent(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "day1.jsonl").write_text('{"user": "a", "assistant": "b"}\n')
    (src / "copy.jsonl").write_text('{"user": "a", "assistant": "b"}\n')
    raw = tmp_path / "raw"
    added, skipped = ingest(src, "traces", raw)
    assert len(added) == 1 and len(skipped) == 1
    added2, skipped2 = ingest(src, "traces", raw)
    assert added2 == [] and len(skipped2) == 2
    assert len(list((raw / "traces").glob("*.jsonl"))) == 1
