"""Property tests: no input crashes a parser or the redact worker; redacted tool arguments stay JSON."""
import json

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_KEY
from schemas.params import RedactParams
from stages.readers import ParseError, normalize, parse_line
from stages.redact import Worker

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=20)
KEYS = ["messages", "conversation", "conversations", "user", "assistant", "system", "tools", "id", "role", "content",
        "from", "value", "tool_calls", "function", "arguments", "name", "input_redacted", "output_approved",
        "human_review", "created_at", "domain", "workflow", "redaction_status", "pii_level"]
shaped = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(KEYS), kids, max_size=6),
                      max_leaves=30)
WORKER = Worker(RedactParams(workers=1), TEST_KEY)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_parse_error(raw):
    try:
        normalize(parse_line(raw))
    except ParseError:
        pass


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), shaped, max_size=8))
def test_any_record_shape_never_crashes_the_worker(rec):
    kind, payload, *_ = WORKER(("traces/x.jsonl", "real", 1, json.dumps(rec).encode()))
    assert kind in ("trace", "reject")
    orjson.loads(payload)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values)
def test_redacted_tool_arguments_stay_valid_json(args):
    rec = {"messages": [{"role": "user", "content": "x"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": json.dumps(args)}}]},
                        {"role": "tool", "tool_call_id": "c", "content": "ok"},
                        {"role": "assistant", "content": "done"}]}
    kind, payload, *_ = WORKER(("traces/x.jsonl", "real", 1, json.dumps(rec).encode()))
    assert kind == "trace"
    out = orjson.loads(payload)
    json.loads(out["messages"][1]["tool_calls"][0]["function"]["arguments"])
