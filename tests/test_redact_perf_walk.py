"""The stage's fast path (strings taken from orjson's output, no rebuild when nothing is found) must
give exactly what the plain walk gives: `strings_into` + `Redactor.redact_many` + `rebuild_strings`."""
import copy

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.detectors import BATCH_SEP, Placeholders, Redactor
from stages.readers import arguments_as_text, arguments_as_values
from stages.redact import CleanCache, _decode, _literals, redact_fields
from stages.scanning import rebuild_strings, strings_into

# Strings that stress the split: quotes, backslashes before quotes, control chars, non-ASCII, NUL,
# placeholders, and secrets so that the found/rebuild path runs too.
NASTY = ['"', "\\", '\\"', '\\\\"', "\\\\", "\n", "\x00", "\x01", "\x02", "\u2028", "é", "😀", "<EMAIL_1>",
         "alice@acme-corp.io", "password=hunter2x", "AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2" * 9, "192.0.2.1",
         "8.8.8.8", "/home/bob/x", "token: Zx9kQ2mN8vB4cR7tY1uI0oP3", " ", ":"]
text = st.lists(st.sampled_from(NASTY) | st.text(max_size=6), max_size=6).map("".join)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False) | text
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4), max_leaves=25)
REDACTOR = Redactor()


def _reference(fields, redactor):
    """redact_fields as it was before the fast path."""
    arguments_as_values(fields["messages"])
    texts = []
    strings_into(fields, texts)
    table = Placeholders()
    out = rebuild_strings(fields, iter(redactor.redact_many(texts, table)))
    arguments_as_text(out["messages"])
    return out, table.counts


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(values)
def test_literals_give_the_walk_strings(obj):
    obj = orjson.loads(orjson.dumps(obj))  # what the stage sees: orjson-made values
    texts = []
    strings_into(obj, texts)
    lits, hidden, lt = _literals(obj)
    assert lt == any("<" in t for t in texts)
    assert len(lits) == len(texts)
    if not texts:
        return  # the stage decodes only for >= 2 strings
    assert _decode(b'["' + b'","'.join(lits) + b'"]', hidden) == texts
    sep = orjson.dumps(BATCH_SEP)[1:-1]
    assert _decode(b'"' + sep.join(lits) + b'"', hidden) == BATCH_SEP.join(texts)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(text, text, values, st.lists(st.tuples(text, values), max_size=3))
def test_redact_fields_matches_the_walk(content, name, extra, args):
    fields = {
        "format": "openai", "review": {"status": "unknown", "notes": content},
        "messages": [{"role": "user", "content": content},
                     {"role": "assistant", "content": "", "tool_calls": [
                         {"id": "call_1", "type": "function",
                          "function": {"name": name, "arguments": orjson.dumps(dict(args)).decode()}}]}],
        "tools": None, "extra": {"x": extra, name: content},
    }
    fields = orjson.loads(orjson.dumps(fields))
    got, got_counts = redact_fields(copy.deepcopy(fields), REDACTOR)
    want, want_counts = _reference(copy.deepcopy(fields), REDACTOR)
    assert orjson.dumps(got) == orjson.dumps(want)
    assert got_counts == want_counts


def test_redact_fields_finds_secrets_in_keys_and_arguments():
    fields = {"format": "openai", "messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"to": "bob@acme-corp.io"}'}}]}],
        "extra": {"carol@acme-corp.io": 'say "hi" \\" to dave@acme-corp.net'}}
    out, counts = redact_fields(fields, REDACTOR)
    blob = orjson.dumps(out)
    assert b"acme-corp.io" not in blob and b"acme-corp.net" not in blob
    assert counts["email"] == 3


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(text, text), min_size=1, max_size=6))
def test_clean_cache_changes_nothing(pairs):
    # One cache across records, as in a worker: strings seen clean earlier are not scanned again,
    # and every record must still come out exactly as without the cache.
    cache = CleanCache(max_entries=8)  # small, so that clearing is exercised too
    for content, note in pairs:
        fields = orjson.loads(orjson.dumps({
            "format": "openai", "review": {"status": "unknown", "notes": note},
            "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": note}],
            "tools": None, "extra": {content: note}}))
        got = redact_fields(copy.deepcopy(fields), REDACTOR, cache)
        want = redact_fields(copy.deepcopy(fields), REDACTOR)
        assert orjson.dumps(got[0]) == orjson.dumps(want[0]) and got[1] == want[1]


def test_clean_cache_keeps_only_clean_strings():
    cache = CleanCache()
    fields = {"format": "openai", "messages": [{"role": "user", "content": "mail bob@acme-corp.io"}], "extra": {}}
    redact_fields(copy.deepcopy(fields), REDACTOR, cache)
    assert not cache.clean  # a trace with a finding adds nothing
    clean = {"format": "openai", "messages": [{"role": "user", "content": "hello there"}], "extra": {}}
    redact_fields(copy.deepcopy(clean), REDACTOR, cache, fast=False)  # the memo belongs to the full path
    assert b"hello there" in cache.clean
    out, counts = redact_fields(copy.deepcopy(fields), REDACTOR, cache)
    assert "bob@acme-corp.io" not in orjson.dumps(out).decode() and counts["email"] == 1


def test_block_equals_one_by_one():
    # A worker scans the new strings of SCAN_BATCH records in one pass and keeps a clean cache;
    # each record must come out as it does alone in a fresh worker.
    from conftest import TEST_KEY
    from schemas.params import RedactParams
    from stages.redact import SCAN_BATCH, Worker

    secrets = ["bob@acme-corp.io", "AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2" * 9, "password=hunter2x", "8.8.8.8",
               "my aws", "api_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "<EMAIL_1>", "x" * 30, ""]
    lines = []
    for i in range(3 * SCAN_BATCH + 5):
        s = secrets[i % len(secrets)]
        rec = {"id": f"r{i % 50}", "messages": [{"role": "user", "content": f"hi {s}"},
                                              {"role": "assistant", "content": s, "tool_calls": [
                                                  {"function": {"name": "f", "arguments": {"q": s, s: i}}}]}],
               "tools": [{"type": "function", "function": {"name": "f", "description": "same every time"}}]}
        lines.append((i + 1, orjson.dumps(rec) if i % 17 else b"{not json"))
    params = RedactParams(workers=1)
    got = Worker(params, TEST_KEY).block("traces/x.jsonl", "real", lines)
    want = [Worker(params, TEST_KEY)(("traces/x.jsonl", "real", n, raw)) for n, raw in lines]
    assert got == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(['"', ":", ",", "{", "pass", "key", "token", "mail", "x", "_", '":"', '","value":',
                                 '":{', "secretkey", "a" * 30]), max_size=30).map("".join))
def test_keyed_matches_are_finditers(text):
    """The root-directed search yields what the regex's own finditer yields, match for match."""
    from stages.redact import _KEYED, _keyed_matches

    low = text.encode()
    assert [m.span() for m in _keyed_matches(low)] == [m.span() for m in _KEYED.finditer(low)]
