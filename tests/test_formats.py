"""Real agent trace formats, one fixture each (tests/fixtures/formats/, built from each format's public
documentation and public samples): what each reader keeps, and that nothing is dropped silently."""
from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import orjson
import pytest

from conftest import ROOT, SHARED, TEST_KEY
from schemas.params import RedactParams
from schemas.records import Reject, Trace
from stages import redact
from stages.detectors import PLACEHOLDER_RE, Placeholders, Redactor
from stages.readers import ParseError, normalize, parse_line, session_traces, sniff_file

FIXTURES = ROOT / "tests" / "fixtures" / "formats"
EXPECTED_FORMAT = {
    "anthropic_messages.jsonl": "anthropic", "claude_code_session.jsonl": "claude_code",
    "claude_code_stream_json.jsonl": "claude_code",
    "codex_rollout.jsonl": "codex", "codex_rollout_legacy.jsonl": "codex", "hermes_function_calling.jsonl": "hermes",
    "llamafactory_typed_parts.jsonl": "openai", "openai_legacy.jsonl": "openai", "openai_responses.jsonl": "responses",
}


def traces_of(name: str) -> list[dict]:
    path = FIXTURES / name
    lines = [(i + 1, l.rstrip(b"\n")) for i, l in enumerate(open(path, "rb")) if l.strip()]
    fmt = sniff_file(path)
    if fmt != "records":
        return [r for _, r, _ in session_traces(fmt, [(n, parse_line(l)) for n, l in lines])]
    return [normalize(parse_line(l)) for _, l in lines]


def calls(m: dict) -> list[tuple[str, str, dict]]:
    return [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m.get("tool_calls") or []]


@pytest.mark.parametrize("name", sorted(EXPECTED_FORMAT))
def test_every_fixture_parses_in_its_format(name):
    recs = traces_of(name)
    assert recs and all(not isinstance(r, ParseError) for r in recs)
    assert {r["format"] for r in recs} == {EXPECTED_FORMAT[name]}
    for r in recs:  # every tool result answers a call made before it
        made = set()
        for m in r["messages"]:
            made |= {c[0] for c in calls(m)}
            if m["role"] == "tool":
                assert m.get("tool_call_id") in made


def test_claude_code_session_one_trace_per_thread():
    main, side = traces_of("claude_code_session.jsonl")
    roles = [m["role"] for m in main["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "tool", "user", "assistant", "tool", "assistant"]
    # the three events of one streamed reply (thinking, text, tool_use) are one assistant turn
    assert main["messages"][1]["content"] == "I'll run the test to see the failure."
    assert [c[1] for c in calls(main["messages"][1])] == ["Bash"]
    assert [c[1] for c in calls(main["messages"][3])] == ["Read", "Grep"]  # parallel calls
    assert main["messages"][6]["content"].endswith("[image]")
    assert main["omitted"] == {"image": 1, "off_thread_message": 1, "thinking": 1, "tool_error": 1}
    assert main["extra"]["tool_errors"] == ["toolu_03"] and main["extra"]["model_used"] == "claude-sonnet-4-5"
    assert "iVBORw0KGgo" not in json.dumps(main)  # inline image bytes: their size is kept, not the bytes
    assert main["project"] == "invoice-app" and main["workflow"] == "claude_code" and main["source"] == "claude_code"
    assert side["workflow"] == "claude_code_subagent" and side["omitted"] == {"sidechain_events": 2}
    assert side["source_id"] != main["source_id"]


def test_claude_code_headless_stream_json():
    """`claude -p --output-format stream-json`: no parentUuid tree, `session_id`; the file's order is the thread."""
    (r,) = traces_of("claude_code_stream_json.jsonl")
    assert [m["role"] for m in r["messages"]] == ["assistant", "tool", "assistant"]  # the prompt is not in the stream
    assert r["source_id"] == "9b2c4f1e-7d3a-4e8b-a1c5-0f6e2d9b8a77" and r["project"] == "payments"
    assert [e["type"] for e in r["extra"]["events"] if "subtype" in e] == ["system", "result"]


def test_codex_rollouts_both_generations():
    (new,) = traces_of("codex_rollout.jsonl")
    assert [m["role"] for m in new["messages"]] == ["user", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert calls(new["messages"][2])[0][:2] == ("call_kx1", "shell")
    assert calls(new["messages"][4])[0][2].startswith("*** Begin Patch")  # a freeform custom tool call
    assert new["omitted"] == {"thinking": 1} and new["extra"]["model_used"] == "gpt-5-codex"
    assert new["created_at"] == "2025-10-29T00:59:38.317Z" and new["project"] == "svc-billing"
    (old,) = traces_of("codex_rollout_legacy.jsonl")
    assert old["messages"][0] == {"role": "system", "content": "Prefer small diffs."}
    assert old["source_id"] == "8a1d4c55-0e2b-4f6a-9c7d-3b2e1f0a9d88"


def test_anthropic_system_blocks_parallel_calls_errors_and_a_call_as_the_answer():
    first, second = traces_of("anthropic_messages.jsonl")
    assert first["messages"][0] == {"role": "system", "content": "You are a travel assistant. Use the tools for live data."}
    assert [c[1] for c in calls(first["messages"][2])] == ["get_weather", "get_time"]
    assert [m.get("tool_call_id") for m in first["messages"][3:5]] == ["toolu_01A09q90qw90lq917835lq9", "toolu_01B"]
    assert first["extra"]["tool_errors"] == ["toolu_01B"] and first["omitted"]["thinking"] == 1
    assert first["tools"][0]["function"]["parameters"]["required"] == ["city"]  # input_schema -> parameters
    assert second["messages"][0]["content"] == "You file expense reports through the tools."
    last = second["messages"][-1]
    assert last["role"] == "assistant" and last["content"] == "" and calls(last)[0][1] == "file_expense"


def test_openai_legacy_functions_and_typed_parts():
    legacy, drone = traces_of("openai_legacy.jsonl")
    assert legacy["tools"][0]["function"]["name"] == "get_stock_price"
    assert calls(legacy["messages"][2]) == [("call_1", "get_stock_price", {"ticker": "ACME"})]
    assert legacy["messages"][3] == {"role": "tool", "content": '{"price": 41.25, "currency": "USD"}',
                                     "name": "get_stock_price", "tool_call_id": "call_1"}
    assert legacy["messages"][1]["content"] == "How is ACME trading? Chart attached.\n[image]"
    assert legacy["extra"]["images"][0]["url"] == "https://example.com/acme-chart.png"
    assert legacy["extra"]["function_call"] == "auto"
    assert calls(drone["messages"][-1]) == [("call_d1", "takeoff_drone", {"altitude": 10})]


def test_hermes_tags_become_calls_with_ids():
    one, two = traces_of("hermes_function_calling.jsonl")
    assert calls(one["messages"][2]) == [("call_1", "get_stock_fundamentals", {"symbol": "TSLA"})]  # a Python literal
    assert one["messages"][3]["role"] == "tool" and one["messages"][3]["tool_call_id"] == "call_1"
    assert "<tool_response>" not in one["messages"][3]["content"]
    assert [c[2]["to"] for c in calls(two["messages"][-1])] == ["EUR", "GBP"] and two["messages"][-1]["content"] == ""
    # a block that does not parse stays text: nothing is invented, nothing lost
    r = normalize({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "<tool_call>not json</tool_call>"}]})
    assert r["format"] == "sharegpt" and r["messages"][-1]["content"] == "<tool_call>not json</tool_call>"


def test_llamafactory_value_parts():
    movie, circles = traces_of("llamafactory_typed_parts.jsonl")
    assert movie["messages"][0]["content"] == "You are a methodical assistant that uses tools."
    assert calls(movie["messages"][2])[0][1:] == ("get_movie_details", {"title": "Inception"})
    assert movie["omitted"] == {"thinking": 2} and len(movie["extra"]["thinking"]) == 2
    assert [c[2]["radius"] for c in calls(circles["messages"][-1])] == [1.5, 3]


def test_responses_items():
    (r,) = traces_of("openai_responses.jsonl")
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert r["tools"][0]["function"]["name"] == "get_order" and r["tools"][0]["function"]["strict"] is True


@pytest.mark.parametrize("rec,reason,names", [
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "unsupported_part", "document"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "input": {}}]}]}, "invalid_tool_call", "tool_use"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_call", "value": "{oops"}]}]}, "invalid_tool_call", "content[0]"),
    ({"system": 5, "messages": []}, "wrong_type", "system"),
])
def test_what_cannot_be_mapped_is_a_reject_naming_the_field(rec, reason, names):
    with pytest.raises(ParseError) as exc:
        normalize(rec)
    assert exc.value.reason == reason and names in exc.value.detail


def test_unknown_message_and_item_fields_are_kept():
    r = normalize({"messages": [{"role": "user", "content": "a", "weight": 0},
                                {"role": "assistant", "content": "b", "refusal": None, "reasoning_content": "hmm"}]})
    assert r["extra"]["message_fields"] == [{"at": "messages[0]", "weight": 0},
                                            {"at": "messages[1]", "refusal": None, "reasoning_content": "hmm"}]
    r = normalize({"input": [{"role": "user", "content": "q"}, {"type": "web_search_call", "id": "ws_1", "status": "completed"}]})
    assert r["omitted"] == {"item_web_search_call": 1} and r["extra"]["items"][0]["id"] == "ws_1"


# ---------------------------------------------------------------- every leaf string ends up somewhere
_STRUCTURAL = {"type", "role", "from"}  # the readers dispatch on these; an unknown value is a reject


def _leaves(obj, path=()):
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))


def _exempt(path, value) -> bool:
    if path and path[-1] in _STRUCTURAL:
        return True
    if path[-2:] == ("source", "data") or (isinstance(value, str) and value.startswith("data:image")):
        return True  # inline image bytes: kept as their size (tested above), by policy
    return bool(path) and path[-1] in ("sessionId",) or path == ("id",)  # the source id: hashed into the trace id


def _blob(trace: dict) -> str:
    texts = [s for _, s in _leaves(trace)]
    for m in trace["messages"]:
        for c in m.get("tool_calls") or ():
            texts += [s for _, s in _leaves(json.loads(c["function"]["arguments"]))]
    return "\x00".join(texts)


def _redacted_forms(blob: str) -> list[re.Pattern]:
    """The trace's strings that hold placeholders, as patterns in which each placeholder stands for any text."""
    out = []
    for t in re.split(r"[\x00\x01]", blob):
        if PLACEHOLDER_RE.search(t):
            parts = PLACEHOLDER_RE.split(t)  # text, kind, n, text, kind, n, ...
            out.append(re.compile(".+?".join(re.escape(p) for p in parts[::3]), re.S))
    return out


def _kept(s: str, blob: str, redactor: Redactor, forms: list | None = None) -> bool:
    if s in blob:
        return True
    if forms and any(f.fullmatch(s) for f in forms):  # redacted in place, the trace's own way (keyed secrets too)
        return True
    red = redactor.redact_many([s], Placeholders())[0]
    if red != s:  # redaction placeholders count as kept, whatever their number in the trace
        pattern = "".join(r"<[A-Z][A-Z0-9_]*_\d+>" if i % 3 == 1 else re.escape(p)
                          for i, p in enumerate(PLACEHOLDER_RE.split(red)) if i % 3 != 2)
        if re.search(pattern, blob):
            return True
    tagged = re.split(r"<tool_(?:call|response)>(.*?)</tool_(?:call|response)>", s, flags=re.S)
    if len(tagged) > 1:  # Hermes tags become structure: each block's strings, and the text around them
        return all(_kept(p.strip(), blob, redactor, forms) for p in tagged if p.strip())
    inner = s.strip()  # JSON (or Python-literal) text becomes structure: its strings must be kept
    for parse in (orjson.loads, ast.literal_eval):
        try:
            value = parse(inner)
        except Exception:
            continue
        if isinstance(value, (dict, list)):
            return all(_kept(v, blob, redactor, forms) for p, v in _leaves(value) if not _exempt(p, v))
    return False


# The shapes we read before: agentic-stack's approved runs, openclaw's rows, LLaMA-Factory's glaive ShareGPT sample.
SHARED_SAMPLES = ["contracts/agentic-stack/approved-runs.redacted.jsonl", "contracts/openclaw-ft/val_20.example.jsonl",
                  "data/public/llama-factory-glaive-toolcall-100.jsonl"]


@pytest.mark.parametrize("name", sorted(EXPECTED_FORMAT) + SHARED_SAMPLES)
def test_every_leaf_string_reaches_a_trace_or_a_reject(tmp_path, name):
    src = FIXTURES / name if name in EXPECTED_FORMAT else SHARED / name
    raw = tmp_path / "raw"
    (raw / "traces").mkdir(parents=True)
    shutil.copy(src, raw / "traces" / src.name)
    params = RedactParams(workers=1)
    m = redact.run(raw, tmp_path / "traces.jsonl", tmp_path / "rejects.jsonl", params, TEST_KEY)
    traces = [Trace.model_validate(orjson.loads(l)).model_dump(mode="json") for l in open(tmp_path / "traces.jsonl", "rb")]
    rejected = {Reject.model_validate(orjson.loads(l)).line for l in open(tmp_path / "rejects.jsonl", "rb")}
    assert m["traces"] == len(traces) and traces
    blob = "\x01".join(_blob(t) for t in traces)
    redactor, forms = Redactor(), _redacted_forms(blob)
    missing = []
    for lineno, line in enumerate(open(src, "rb"), start=1):
        if lineno in rejected or not line.strip():
            continue
        for path, s in _leaves(orjson.loads(line)):
            if not _exempt(path, s) and not _kept(s, blob, redactor, forms):
                missing.append((lineno, path, s[:60]))
    assert not missing
    assert all(t["source_run_id_hash"] for t in traces if t["format"] in ("claude_code", "codex", "anthropic"))


def test_the_leaf_check_can_fail(tmp_path):
    """The check above is not vacuous: a string the trace lacks is reported."""
    trace = traces_of("openai_legacy.jsonl")[0]
    blob = _blob(trace)
    assert _kept("ACME is at 41.25 USD.", blob, Redactor())
    assert not _kept("a sentence no trace holds", blob, Redactor())


# ---------------------------------------------------------------- through export and build_dataset
def test_tool_calls_survive_into_training_rows_export_and_eval_cases(tmp_path):
    from test_data_stages import CONTRACTS, run_all

    import jsonschema

    from schemas.params import ExportParams

    raw = tmp_path / "raw"
    (raw / "traces").mkdir(parents=True)
    for name in EXPECTED_FORMAT:
        shutil.copy(FIXTURES / name, raw / "traces" / name)
    # eval_share 0.5, seed 3: both sides (training examples, eval cases) get two of the four tool-call answers
    out = run_all(raw, tmp_path / "work", TEST_KEY, ep=ExportParams(eval_share=0.5, seed=3))
    assert out["redact"]["rejected"] == 0 and out["redact"]["traces"] == 14
    # Claude Code (17 lines, 2 traces), Claude Code stream-json (5 lines), Codex, Codex legacy
    assert out["redact"]["session_lines_merged"] == 15 + 4 + 11 + 6
    assert "empty_answer" not in out["manifest"]["filtered_by_reason"]
    exp = tmp_path / "work" / "export"
    te_schema = json.loads((CONTRACTS / "agentic-stack" / "training-example.schema.json").read_text())
    ev_schema = json.loads((CONTRACTS / "agentic-stack" / "eval-case.schema.json").read_text())
    examples = [json.loads(l) for l in open(exp / "training-examples.jsonl")]
    cases = [json.loads(l) for l in open(exp / "eval-cases.jsonl")]
    for ex in examples:
        jsonschema.validate(ex, te_schema)
    for c in cases:
        jsonschema.validate(c, ev_schema)
    # the conversation of an example is its trace (source_trace_ids[0]) in redact's traces.jsonl
    by_id = {t["id"]: t for t in map(json.loads, open(tmp_path / "work" / "redact" / "traces.jsonl"))}
    call_outputs = [ex["output"] for ex in examples
                    if by_id[ex["metadata"]["source_trace_ids"][0]]["messages"][-1].get("tool_calls")]
    call_cases = [c for c in cases if any(e.startswith("<tool_call>") for e in c["expected_behavior"])]
    assert call_outputs and call_cases
    assert all(o.startswith("<tool_call>\n{\"name\": ") for o in call_outputs)
    assert all("Calls the approved tools, in order, with the approved arguments" in c["rubric"] for c in call_cases)
    bd = tmp_path / "work" / "build_dataset"
    rows = [json.loads(l) for f in ("train.jsonl", "val.jsonl", "eval.jsonl") for l in open(bd / f)]
    finals = [r["messages"][-1] for r in rows if r["messages"][-1].get("tool_calls")]
    names = {c["function"]["name"] for m in finals for c in m["tool_calls"]}
    assert {"takeoff_drone", "file_expense", "convert_currency", "circle_area"} <= names
    eval_rows = [json.loads(l) for l in open(bd / "eval.jsonl")]
    call_rows = [r for r in eval_rows if r["messages"][-1].get("tool_calls")]
    assert call_rows and all(any(e.startswith("<tool_call>") for e in r["expected_behavior"]) for r in call_rows)


# ---------------------------------------------------------------- make ingest on a Claude Code projects folder
def test_ingest_a_claude_code_projects_folder_says_what_it_found(tmp_path, capsys):
    from stages import ingest

    projects = tmp_path / ".claude" / "projects"
    proj = projects / "-home-dev-projects-invoice-app"
    sub = proj / "5f0c8d2e-1b7a-4c3e-9a61-2f4b8e7d0c11" / "subagents"
    sub.mkdir(parents=True)
    lines = (FIXTURES / "claude_code_session.jsonl").read_text().splitlines(keepends=True)
    (proj / "5f0c8d2e-1b7a-4c3e-9a61-2f4b8e7d0c11.jsonl").write_text("".join(lines[:15]))
    (sub / "agent-a1b2c3.jsonl").write_text("".join(lines[15:]))
    (projects.parent / "history.jsonl").write_text('{"display": "fix the test", "pastedContents": {}, "timestamp": 1}\n')
    (proj / "sessions-index.json").write_text("{}")
    raw = tmp_path / "raw"
    ingest.main(["--src", str(projects.parent), "--kind", "traces", "--raw", str(raw)])
    out = capsys.readouterr().out
    assert out.count("(claude_code, from projects/-home-dev-projects-invoice-app/") == 2
    assert "skipped history.jsonl (no line in its first 50 is a trace format we read)" in out
    assert "ingest: 2 file(s) added (2 claude_code), 1 skipped" in out
    m = redact.run(raw, tmp_path / "t.jsonl", tmp_path / "r.jsonl", RedactParams(workers=1), TEST_KEY)
    assert m["traces"] == 2 and m["rejected"] == 0
    workflows = sorted(orjson.loads(l)["workflow"] for l in open(tmp_path / "t.jsonl", "rb"))
    assert workflows == ["claude_code", "claude_code_subagent"]


def test_claude_code_inline_file_bytes_are_not_kept_but_counted():
    """An image Read: Claude Code keeps the file's base64 in `toolUseResult` too; the trace keeps its size only."""
    blob = "iVBORw0KGgo" + "A" * 600
    ev = [{"type": "user", "sessionId": "s1", "uuid": "u1", "parentUuid": None, "message": {"role": "user", "content": "look at logo.png"}},
          {"type": "assistant", "sessionId": "s1", "uuid": "a1", "parentUuid": "u1", "message": {
              "role": "assistant", "id": "m1", "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {"file_path": "logo.png"}}]}},
          {"type": "user", "sessionId": "s1", "uuid": "u2", "parentUuid": "a1",
           "message": {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": blob}}]}]},
           "toolUseResult": {"type": "image", "file": {"base64": blob, "type": "image/png", "originalSize": 450}}},
          {"type": "assistant", "sessionId": "s1", "uuid": "a2", "parentUuid": "u2", "message": {
              "role": "assistant", "id": "m2", "content": [{"type": "text", "text": "A blue logo."}]}}]
    ((_, r, took),) = session_traces("claude_code", list(enumerate(ev, 1)))
    assert took == 4 and blob not in json.dumps(r)
    assert r["omitted"] == {"image": 1, "inline_bytes": 1}
    assert r["messages"][2] == {"role": "tool", "content": "[image]", "tool_call_id": "t1"}


def test_server_tools_refusals_audio_and_codex_developer_notes():
    r = normalize({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "news on ACME?"},
                                     {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}}]},
        {"role": "assistant", "content": [{"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                                           "input": {"query": "ACME news"}}]},
        {"role": "user", "content": [{"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
                                      "content": [{"type": "web_search_result", "title": "ACME up", "url": "https://example.com/a"}]}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't give investment advice."}]}]})
    assert r["format"] == "anthropic" and [m["role"] for m in r["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert r["messages"][0]["content"] == "news on ACME?\n[audio]" and r["omitted"] == {"audio": 1}
    assert r["extra"]["audio"] == [{"at": "messages[0].content[1]", "format": "wav", "inline_bytes": 16}]
    assert calls(r["messages"][1]) == [("srvtoolu_1", "web_search", {"query": "ACME news"})]
    assert r["messages"][2]["tool_call_id"] == "srvtoolu_1" and "ACME up" in r["messages"][2]["content"]
    assert r["messages"][3]["content"] == "I can't give investment advice."
    lines = [(1, {"type": "session_meta", "payload": {"id": "c1", "timestamp": "t"}}),
             (2, {"type": "response_item", "payload": {"type": "message", "role": "user", "content": "ctx"}}),
             (3, {"type": "response_item", "payload": {"type": "message", "role": "developer", "content": "sandbox: on"}}),
             (4, {"type": "response_item", "payload": {"type": "message", "role": "user", "content": "hi"}}),
             (5, {"type": "response_item", "payload": {"type": "message", "role": "assistant", "content": "hello"}})]
    ((_, c, _),) = session_traces("codex", lines)
    assert [m["role"] for m in c["messages"]] == ["system", "user", "user", "assistant"]
