"""Findings from several sources (the scan, keyed values, canaries) become valid, non-overlapping
replacements with no raw value left: the regression for the glaive leak (issue 10) and properties."""
from __future__ import annotations

import json
import re

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHARED, TEST_KEY
from schemas.params import RedactParams
from stages.detectors import BATCH_SEP, DETECTORS, PLACEHOLDER_RE, Finding, Placeholders, Redactor, merge_findings
from stages.readers import normalize, parse_line
from stages.redact import Worker, redact_fields

GLAIVE = SHARED / "data" / "public" / "llama-factory-glaive-toolcall-100.jsonl"
R = Redactor()


def _glaive_shape() -> dict:
    """Line 69 of the glaive file, as the reader normalises it (built here when ../shared is absent)."""
    if GLAIVE.exists():
        raw = GLAIVE.read_bytes().split(b"\n")[68]
    else:
        raw = json.dumps({"conversations": [
            {"from": "human", "value": 'My username will be "JohnDoe", password will be "password123" and email will be "johndoe@example.com".'},
            {"from": "function_call", "value": json.dumps({"name": "create_user", "arguments": {
                "username": "JohnDoe", "password": "password123", "email": "johndoe@example.com"}})},
            {"from": "observation", "value": "{\"status\": \"success\"}"}]}).encode()
    f = normalize(parse_line(raw))
    f.pop("source_id")
    return f


def test_glaive_line_69_prose_names_the_keyed_password_before_the_email():
    """Today's code appended the keyed value's findings after the scan's (an email later in the same
    string) and applied them unsorted: the prose was copied twice and `password123` survived."""
    out, counts = redact_fields(_glaive_shape(), Redactor())
    blob = orjson.dumps(out).decode()
    assert "password123" not in blob
    user = next(m["content"] for m in out["messages"] if "username will be" in (m.get("content") or ""))
    # every char outside the two values is kept exactly once. The address is on a documentation domain, but the
    # tool call's `email` field says it is this user's: replaced everywhere (issue 10: no raw value survives).
    assert user == 'My username will be "JohnDoe", password will be "<PASSWORD_1>" and email will be "<EMAIL_1>".'
    assert "johndoe@example.com" not in blob
    call = next(m for m in out["messages"] if m.get("tool_calls"))
    args = json.loads(call["tool_calls"][0]["function"]["arguments"])
    assert args == {"username": "JohnDoe", "password": "<PASSWORD_1>", "email": "<EMAIL_1>"}
    assert counts["secret_assignment"] == 2 and counts["email"] == 2


def test_documentation_addresses_stay_in_prose_but_not_in_a_field_that_holds_one():
    f = {"format": "openai", "extra": {}, "messages": [
        {"role": "user", "content": "Docs say: write to support@example.org for help."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "notify", "arguments": json.dumps({"user_email": "ann@example.net"})}}]}]}
    out, _ = redact_fields(f, Redactor())
    blob = orjson.dumps(out).decode()
    assert "support@example.org" in blob and "ann@example.net" not in blob


def test_same_shape_with_a_real_address_is_fully_replaced():
    f = {"format": "openai", "extra": {}, "messages": [
        {"role": "user", "content": 'password will be "pw-9xQ2!z" and email will be "jd@acme-corp.io".'},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "create_user", "arguments": json.dumps({"email": "jd@acme-corp.io", "password": "pw-9xQ2!z"})}}]}]}
    out, _ = redact_fields(f, Redactor())
    blob = orjson.dumps(out).decode()
    assert "pw-9xQ2!z" not in blob and "jd@acme-corp.io" not in blob
    assert out["messages"][0]["content"] == 'password will be "<PASSWORD_1>" and email will be "<EMAIL_1>".'


# ---------------------------------------------------------------- properties

# Distinct chars make every position identifiable, and no detector fires on them.
_ALPHA = [chr(0x4E00 + i) for i in range(400)]


@st.composite
def _text_and_findings(draw):
    n = draw(st.integers(1, 120))
    text = "".join(_ALPHA[:n])
    k = draw(st.integers(0, 12))
    found = []
    for _ in range(k):
        s = draw(st.integers(0, n - 1))
        e = draw(st.integers(s + 1, n))
        det = draw(st.sampled_from(DETECTORS))
        found.append(Finding(det, det.upper()[:8].replace("-", "_") or "X", s, e))
    return text, found


@settings(max_examples=400, deadline=None)
@given(_text_and_findings())
def test_merged_findings_are_sorted_disjoint_and_cover_every_input_span(case):
    _, found = case
    merged = merge_findings(found)
    for a, b in zip(merged, merged[1:]):
        assert a.end <= b.start
    covered = {i for f in merged for i in range(f.start, f.end)}
    assert all(set(range(f.start, f.end)) <= covered for f in found)
    assert covered == {i for f in found for i in range(f.start, f.end)}


@settings(max_examples=400, deadline=None)
@given(_text_and_findings(), st.permutations(range(12)))
def test_any_order_of_overlapping_findings_leaves_no_raw_char_and_keeps_the_rest_once(case, perm):
    text, found = case
    found = [found[i] for i in perm if i < len(found)]  # sources append in any order
    table = Placeholders()
    out = R.settle_many([text], found, table)[0]
    secret = {text[i] for f in found for i in range(f.start, f.end)}
    assert not secret & set(out)
    rest = PLACEHOLDER_RE.sub("", out)
    assert rest == "".join(c for c in text if c not in secret)
    assert PLACEHOLDER_RE.sub("", out) == rest and all(PLACEHOLDER_RE.fullmatch(m.group()) for m in PLACEHOLDER_RE.finditer(out))


_VALUES = st.text(alphabet="abcdefghJKLMNP0123456789!#%", min_size=5, max_size=14).map(lambda s: "Q" + s)
_FILLER = st.sampled_from(["", " ", '"', "and ", "pass ", "email: ", "= ", ", ", "\n"])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pw=_VALUES, user=st.text(alphabet="abcdefgh", min_size=2, max_size=8),
       pieces=st.lists(st.sampled_from(["pw", "email", "pw", "fill"]), min_size=1, max_size=8),
       fill=st.lists(_FILLER, min_size=8, max_size=8), canary=st.booleans())
def test_keyed_scan_and_canary_findings_in_any_arrangement_leave_no_raw_value(pw, user, pieces, fill, canary):
    """The keyed password, the scanned email and a canary, repeated and abutting in prose, in
    arguments and in metadata: each goes, everywhere, and the arguments stay JSON."""
    email = f"{user}@acme-corp.io"
    token = "cnry-" + pw[::-1]
    parts = []
    for i, p in enumerate(pieces):
        parts.append({"pw": pw, "email": email, "fill": token if canary else "x"}[p] + fill[i % 8])
    prose = "".join(parts)
    fields = {"format": "openai", "extra": {"note": prose, "login": {"password": pw}}, "messages": [
        {"role": "user", "content": prose + " " + email},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": json.dumps({"password": pw, "email": email, "note": prose})}}]}]}
    worker = Worker(RedactParams(workers=1, canaries=[token] if canary else []), TEST_KEY)
    out, _ = redact_fields(fields, worker.redactor, canaries=worker.canaries)
    blob = orjson.dumps(out).decode()
    assert pw not in blob and email not in blob
    if canary:
        assert token not in blob
    json.loads(out["messages"][1]["tool_calls"][0]["function"]["arguments"])
    for m in PLACEHOLDER_RE.finditer(blob):
        assert m.group(1) and m.group(2).isdigit()


def test_settle_many_across_strings_keeps_each_string_separate():
    texts = ["a secret-ish zzz1", "zzz1 again"]
    joined = BATCH_SEP.join(texts)
    found = [Finding("secret_assignment", "PASSWORD", joined.index("zzz1"), joined.index("zzz1") + 4),
             Finding("canary", "SECRET", joined.rindex("zzz1"), joined.rindex("zzz1") + 4)]
    out = R.settle_many(texts, list(reversed(found)), Placeholders())
    assert out == ["a secret-ish <PASSWORD_1>", "<SECRET_1> again"]


@pytest.mark.skipif(not GLAIVE.exists(), reason="needs ../shared")
def test_the_whole_glaive_sample_keeps_its_text_outside_the_replacements():
    """Every line of the public file: no placeholder glued to another (the garbling signature of
    unsorted, overlapping findings) and no value its structure names secret."""
    from stages.detectors import structural_secrets
    from stages.readers import arguments_as_values

    w = Worker(RedactParams(workers=1), TEST_KEY)
    lines = [(i, raw) for i, raw in enumerate(GLAIVE.read_bytes().splitlines(), 1) if raw.strip()]
    for (_, raw), (kind, payload, *_) in zip(lines, w.block("traces/glaive.jsonl", "real", lines)):
        assert kind == "trace"
        assert not re.search(rb"<[A-Z_]+_\d+><[A-Z_]+_\d+>", payload)
        fields = normalize(parse_line(raw))
        arguments_as_values(fields["messages"])
        for value, _, _ in structural_secrets(fields, R):  # every value its structure names secret is gone
            assert value.encode() not in payload
