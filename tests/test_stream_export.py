"""export's direct dict building equals the pydantic models' dumps it replaced (and falls back to them)."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.params import RedactParams
from schemas.records import TraceRecord, TrainingExample
from stages import export, redact
from stages.core import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _model_trace_record(trace: dict) -> dict:
    """trace_record as it was: every record through TraceRecord."""
    E = export
    extra = trace["extra"]
    review = {"status": trace["review"]["status"]}
    if trace["review"].get("notes"):
        review["review_notes"] = trace["review"]["notes"]
    if trace["review"].get("edit_distance_estimate"):
        review["edit_distance_estimate"] = trace["review"]["edit_distance_estimate"]
    target_use = E._strs(extra.get("target_use")) or ["retrieval", "eval"] + (["fine_tune_candidate"] if trace["trainable"] else [])
    return TraceRecord(
        id=trace["id"], created_at=trace.get("created_at") or E.EPOCH, project=trace["project"],
        domain=trace["domain"], workflow=trace["workflow"],
        skill=extra.get("skill") if isinstance(extra.get("skill"), str) else None,
        host=trace["source"], model_used=extra.get("model_used") if isinstance(extra.get("model_used"), str) else None,
        input_summary=extra.get("input_summary") if isinstance(extra.get("input_summary"), str) else None,
        input_hash=E.content_id(E.render(E.prompt_messages(trace), ("system", "user", "assistant", "tool"))),
        pii_level=E._pii_level(trace), redaction_status=E._redaction_status(trace),
        context_tokens_before=E._num(extra.get("context_tokens_before")),
        context_tokens_after=E._num(extra.get("context_tokens_after")),
        output_summary=extra.get("output_summary") if isinstance(extra.get("output_summary"), str) else None,
        human_review=review, eval_tags=E._strs(extra.get("eval_tags")), failure_modes=E._strs(extra.get("failure_modes")),
        trainable=trace["trainable"], target_use=target_use,
        model_target=extra.get("model_target") if isinstance(extra.get("model_target"), dict) else None,
        source_run_id_hash=trace.get("source_run_id_hash"),
    ).model_dump(mode="json", exclude_none=True)


def _model_training_example(trace: dict) -> dict:
    E = export
    return TrainingExample(
        instruction=E.instruction_of(trace), context="", input=E.render(E.prompt_messages(trace)), output=E.answer(trace),
        metadata={
            "domain": trace["domain"], "workflow": trace["workflow"], "source_trace_ids": [trace["id"]],
            "split": "train", "pii_level": E._pii_level(trace), "trainable": True,
            "bucket": trace["bucket"], "source": trace["source"], "outcome": trace["outcome"],
            **({"created_at": trace["created_at"]} if trace.get("created_at") else {}),
        },
    ).model_dump(mode="json", exclude_none=True)


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> list[dict]:
    from tests.conftest import TEST_KEY

    tmp = tmp_path_factory.mktemp("snap")
    shutil.copytree(ROOT / "examples/snapshot", tmp / "raw")
    redact.run(tmp / "raw", tmp / "traces.jsonl", tmp / "rejects.jsonl", RedactParams(workers=1), TEST_KEY)
    return list(read_jsonl(tmp / "traces.jsonl"))


def _same(fast, model, trace: dict) -> None:
    try:
        want = model(copy.deepcopy(trace))
    except ValidationError:
        with pytest.raises(ValidationError):
            fast(copy.deepcopy(trace))
        return
    assert fast(copy.deepcopy(trace)) == want


def test_fast_records_equal_the_models_on_the_example_snapshot(traces):
    assert len(traces) > 500
    for t in traces:
        _same(export.trace_record, _model_trace_record, t)
        if t["trainable"]:
            _same(export.training_example, _model_training_example, t)


def test_off_type_values_go_through_the_model(traces):
    t0 = next(t for t in traces if t["trainable"] and t.get("tools"))
    variants = []
    for field, value in [("project", None), ("project", 7), ("domain", 1.5), ("source", None), ("trainable", "true"),
                         ("trainable", 1), ("source_run_id_hash", 12), ("source_run_id_hash", None), ("created_at", ""),
                         ("outcome", None), ("bucket", 3), ("id", 5),
                         ("outcome", "won"), ("bucket", "other"), ("created_at", 5)]:
        t = copy.deepcopy(t0)
        t[field] = value
        variants.append(t)
    t = copy.deepcopy(t0)
    t["extra"] = {"skill": 3, "model_used": "m", "context_tokens_before": True, "context_tokens_after": 2,
                  "model_target": {"a": None}, "eval_tags": ["x", 1], "target_use": "no"}
    variants.append(t)
    t = copy.deepcopy(t0)
    t["messages"][-1]["content"] = None  # an answer that is no string
    variants.append(t)
    for t in variants:
        _same(export.trace_record, _model_trace_record, t)
        _same(export.training_example, _model_training_example, t)


def _two_ranks(src, d, params):
    """export as two ranks of a multi-machine executor would run it: a part each, merged in rank order."""
    from stages.executor import Executor

    aggs = [export.export_part(src, d, params, Executor(1, rank, 2)) for rank in (1, 0)]  # any rank order
    return export.finish(d, params, export.merge_parts_of(d, 2, aggs[::-1]))


def test_export_file_with_workers_equals_export_in_process(tmp_path, traces):
    from stages.core import atomic_dir, dumps
    from schemas.params import ExportParams

    src = tmp_path / "traces.jsonl"
    src.write_bytes(b"".join(dumps(t) + b"\n" for t in traces))
    outs = {}
    for name, run in [("plain", lambda d: _two_ranks(src, d, ExportParams())),
                      ("one", lambda d: export.export_file(src, d, ExportParams(), workers=1)),
                      ("two", lambda d: export.export_file(src, d, ExportParams(), workers=2))]:
        with atomic_dir(tmp_path / name) as d:
            summary = run(d)
        outs[name] = (summary, {p.relative_to(tmp_path / name).as_posix(): p.read_bytes()
                                for p in sorted((tmp_path / name).rglob("*")) if p.is_file()})
    assert outs["plain"] == outs["one"] == outs["two"]
    assert len(outs["plain"][1]) > 5 and outs["plain"][0]["traces"] == len(traces)


def test_block_aggregates_merged_in_order_equal_one_pass(traces):
    import random

    from schemas.params import ExportParams

    p = ExportParams()
    ts = copy.deepcopy(traces)
    rng = random.Random(5)
    for t in rng.sample(ts, 40):  # ties of the newest instant, spelt differently, and stamps it must skip
        t["created_at"] = rng.choice(["2099-01-01T00:00:00Z", "2099-01-01T00:00:00+00:00", "2099-01-01T01:00:00+01:00",
                                      "2099-01-01T00:00:00", "not a date", ""])
    infos = [export._one(t, p, set(p.approved_statuses))[3] for t in ts]
    one = export._Agg()
    for info in infos:
        one.add(info)
    for _ in range(5):
        merged, i = export._Agg(), 0
        while i < len(infos):
            n = rng.randint(1, 60)
            part = export._Agg()
            for info in infos[i:i + n]:
                part.add(info)
            merged.merge(part)
            i += n
        assert merged.wfs == one.wfs and merged.totals == one.totals and merged.newest == one.newest
        assert merged.tokens_before == one.tokens_before and merged.tokens_after == one.tokens_after
        assert all(list(merged.wfs[k].tools) == list(one.wfs[k].tools) for k in one.wfs)
    assert one.newest[0] == next(t["created_at"] for t in ts if t["created_at"].startswith("2099") and
                                 t["created_at"] != "2099-01-01T00:00:00")
