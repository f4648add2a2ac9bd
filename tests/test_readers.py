"""Every accepted raw shape parses as it is; anything else is a ParseError with a reason."""
import json

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from conftest import SHARED
from stages.readers import ParseError, normalize, normalize_arguments, parse_line


def _lines(path):
    return [l.rstrip(b"\n") for l in open(path, "rb") if l.strip()]


def test_agentic_stack_approved_runs_accepted_as_they_are():
    recs = [normalize(parse_line(l)) for l in _lines(SHARED / "contracts/agentic-stack/approved-runs.redacted.jsonl")]
    assert [r["format"] for r in recs] == ["approved_run", "approved_run"]
    r = recs[0]
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
    assert r["review"]["status"] == "accepted" and r["workflow"] == "lead_intake"
    assert r["extra"]["stable_rules"] and r["extra"]["redaction_status"] == "passed"


def test_openclaw_val_rows_accepted():
    recs = [normalize(parse_line(l)) for l in _lines(SHARED / "contracts/openclaw-ft/val_20.example.jsonl")]
    assert len(recs) == 20 and all(r["format"] == "openclaw_messages" for r in recs)
    assert all(r["messages"][-1]["role"] == "assistant" for r in recs)


def test_sharegpt_toolcalls_public_sample():
    recs = [normalize(parse_line(l)) for l in _lines(SHARED / "data/public/llama-factory-glaive-toolcall-100.jsonl")]
    assert len(recs) == 100
    calls = [m for r in recs for m in r["messages"] if m.get("tool_calls")]
    assert calls, "function_call turns become assistant tool calls"
    for m in calls:
        json.loads(m["tool_calls"][0]["function"]["arguments"])  # still valid JSON
    tools = [m for r in recs for m in r["messages"] if m["role"] == "tool"]
    assert tools and all(m.get("tool_call_id") for m in tools)
    assert all(r["tools"] for r in recs if any(m.get("tool_calls") for m in r["messages"]))


@pytest.mark.parametrize("rec,fmt,roles", [
    ({"conversation": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "openclaw_conversation", ["user", "assistant"]),
    ({"user": "a", "assistant": "b", "system": "s"}, "openclaw_pair", ["system", "user", "assistant"]),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "openclaw_messages", ["user", "assistant"]),
])
def test_openclaw_shapes(rec, fmt, roles):
    r = normalize(rec)
    assert r["format"] == fmt and [m["role"] for m in r["messages"]] == roles


def test_openai_tool_calls_single_and_double_encoded():
    args = {"email": "a@b.c", "n": 1}
    for encoded in (json.dumps(args), json.dumps(json.dumps(args)), args):
        rec = {"tools": [{"type": "function", "function": {"name": "crm_lookup", "parameters": {}}}],
               "messages": [{"role": "user", "content": "x"},
                            {"role": "assistant", "content": None, "tool_calls": [
                                {"id": "call_1", "type": "function", "function": {"name": "crm_lookup", "arguments": encoded}}]},
                            {"role": "tool", "tool_call_id": "call_1", "content": "{}"},
                            {"role": "assistant", "content": "done"}]}
        r = normalize(rec)
        assert r["format"] == "openai"
        assert json.loads(r["messages"][1]["tool_calls"][0]["function"]["arguments"]) == args


def test_normalize_arguments_keeps_non_json_text_as_valid_json():
    assert json.loads(normalize_arguments("not json")) == "not json"


@pytest.mark.parametrize("raw,reason", [
    (b'{"messages": [', "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (b'"str"', "not_an_object"),
    (b"\xff\xfe{}", "invalid_utf8"),
    (b'{"messages": [], "x": NaN}', "invalid_json"),
    (b'{"messages": [], "x": Infinity}', "invalid_json"),
    (b'{"messages": "hi"}', "wrong_type"),
    (b'{"user": 5, "assistant": "b"}', "wrong_type"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "bad_role"),
    (b'{"foo": 1}', "unknown_shape"),
    (b'{"id": "r1", "input_redacted": "x"}', "missing_fields"),
    (b'{"id": ["x"], "messages": []}', "wrong_type"),
])
def test_hostile_lines_raise_with_reason(raw, reason):
    with pytest.raises(ParseError) as exc:
        normalize(parse_line(raw))
    assert exc.value.reason == reason


_RUN_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.sampled_from(["", "x", "yes", "0", "approved"]),
                        st.lists(st.just("a"), max_size=1), st.dictionaries(st.sampled_from(["status", "notes"]),
                                                                           st.sampled_from(["x", None, 1]), max_size=2))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "created_at", "domain", "workflow", "input_redacted", "output_approved",
                                        "redaction_status", "pii_level", "project", "harness", "instruction",
                                        "raw_input_stored", "trainable", "human_review", "task_category", "extra_key"]),
                       _RUN_VALUES, max_size=16),
       st.dictionaries(st.sampled_from(["status", "review_notes", "edit_distance_estimate", "other"]),
                       st.one_of(st.none(), st.sampled_from(["accepted", "x"]), st.integers(0, 1)), max_size=4),
       st.booleans())
def test_approved_runs_read_without_the_model_as_with_it(rec, review, full):
    """The approved-run fast path (plain types, no pydantic) gives what the model path gives, error or fields."""
    import stages.readers as rd

    if full:  # a complete record with plain values, so the fast path runs (the strategy alone rarely builds one)
        rec = {**rec, **{k: "v" for k in rd._RUN_STR}, "human_review": review}
    rec["input_redacted"] = rec.get("input_redacted", "x")  # an approved run either way

    def outcome(plain_ok: bool):
        saved = rd._plain_run
        rd._plain_run = saved if plain_ok else (lambda r: False)
        try:
            return normalize(json.loads(json.dumps(rec)))
        except ParseError as exc:
            return (exc.reason, exc.detail)
        finally:
            rd._plain_run = saved

    assert outcome(True) == outcome(False)


def _fields_reference(rec, fmt, messages, tools, used, ctx):
    """readers._fields before its fast path: every metadata value through _str, in this order."""
    from stages.readers import _keep_raw, _outcome, _review, _source_id, _str

    workflow = _str(rec, "workflow") or _str(rec, "task_category") or "general"
    extra = {k: v for k, v in rec.items() if k not in used}
    extra.update(ctx.extra)
    _keep_raw(rec, extra)
    return {"format": fmt, "source_id": _source_id(rec), "source": _str(rec, "source") or _str(rec, "harness") or fmt,
            "created_at": _str(rec, "created_at"), "project": _str(rec, "project") or "unknown",
            "domain": _str(rec, "domain") or "general", "workflow": workflow,
            "task_category": _str(rec, "task_category") or workflow, "outcome": _outcome(rec.get("outcome")),
            "review": _review(rec), "messages": messages, "tools": tools, "extra": extra,
            "omitted": dict(sorted(ctx.omitted.items()))}


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["workflow", "task_category", "source", "harness", "created_at", "project",
                                        "domain", "id", "review"]),
                       st.one_of(st.none(), st.sampled_from(["", "x", "ops"]), st.integers(0, 2), st.lists(st.just(1),
                                                                                                     max_size=1)),
                       max_size=9))
def test_metadata_fast_path_gives_the_checked_fields_and_errors(meta):
    import stages.readers as rd

    rec = {**meta, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}

    def outcome():
        try:
            return normalize(json.loads(json.dumps(rec)))
        except ParseError as exc:
            return (exc.reason, exc.detail)

    got = outcome()
    saved, rd._fields = rd._fields, _fields_reference
    try:
        assert got == outcome()
    finally:
        rd._fields = saved
