"""The clean-record prefilter (Redactor.nothing_to_find) is sound: the fast path and the full path
give the same bytes on every fixture, and it never clears a record the scan would change."""
from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from schemas.params import RedactParams
from stages import redact as R
from stages.core import load_params
from stages.detectors import Redactor

ROOT = Path(__file__).resolve().parents[1]
KEY = b"test-key-0123456789abcdef-not-for-production"


def _outputs(raw_root: Path, fast: bool, hyperscan: bool = True) -> list:
    params = load_params(ROOT / "params.yaml", "redact", RedactParams)
    worker = R.Worker(params, KEY)
    worker.fast = fast  # forced: the stage itself takes the fast path only with Hyperscan
    if not hyperscan:
        worker.redactor._hs = None  # the pure-Python checks
    files, _ = R.discover(raw_root)
    return [piece for block in R.plan_work(files) for piece in R.redact_block(worker, block)]


def _fixture_snapshot(root: Path) -> Path:
    """The format fixtures, the redaction fixtures (as prose and as tool-call arguments) and the
    hostile lines of test_data_stages, as one raw snapshot."""
    from tests.test_data_stages import HOSTILE

    fx = ROOT / "tests" / "fixtures"
    for f in (fx / "formats").glob("*.jsonl"):
        (root / "traces").mkdir(parents=True, exist_ok=True)
        (root / "traces" / f.name).write_bytes(f.read_bytes())
    lines = []
    for f in (fx / "redaction").glob("*.jsonl"):
        for raw in f.read_text(encoding="utf-8").splitlines():
            case = orjson.loads(raw)
            v = case.get("value") or ""
            for text in (case.get("text"), case.get("prose")):
                if text:
                    lines.append({"messages": [{"role": "user", "content": text.replace("{v}", v)},
                                               {"role": "assistant", "content": "ok"}]})
            if case.get("args"):
                args = orjson.dumps(case["args"]).decode().replace("{v}", v)
                lines.append({"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": None,
                              "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "run", "arguments": args}}]}]})
    (root / "synthetic").mkdir(parents=True, exist_ok=True)
    (root / "synthetic" / "redaction.jsonl").write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n")
    for rel, rows in HOSTILE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\n".join(r if isinstance(r, bytes) else (r.encode() if isinstance(r, str) else orjson.dumps(r))
                                 for r in rows) + b"\n")
    return root


@pytest.mark.parametrize("hyperscan", [True, False])
def test_fast_and_full_paths_give_the_same_bytes(tmp_path, hyperscan):
    from bench.corpus import generate  # the bench's generator: every shape, ~5% secrets

    generate(tmp_path / "bench", 1500, seed=3)
    roots = [ROOT / "examples" / "snapshot", tmp_path / "bench", _fixture_snapshot(tmp_path / "fixtures")]
    for root in roots:
        full, fast = _outputs(root, False), _outputs(root, True, hyperscan)
        assert sum(len(r[4]) for r in full) > 10, root  # traces and rejects were produced
        assert fast == full, root


SECRETS = ["AKIAIOSFODNN7EXAMPLA", "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5", "jane.doe@acme-corp.io",
           "+44 20 7946 0958", "(415) 555-2671", "4111 1111 1111 1111", "123-45-6789", "8.8.4.4",
           "password=Tr0ub4dor&3", "Authorization: Bearer abcDEF123456ghiJKL", "/home/alice/src", "~bob/",
           "sk-proj-" + "Ab1" * 10, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig", "DE89370400440532013000",
           "postgres://u:hunter2x@db.internal/x", "api_key: " + "Zx9" * 8, "c2VjcmV0IHBhc3N3b3JkPWh1bnRlcjI=",
           "token=%41%4B%49%41", "dob: 1990-05-15", "mysql -u root -pS3cret", "2001:4860:4860::8888"]


KEYS = ["password", "api_key", "DB_TOKEN", "x-amz-signature", "Authorization", "cookie", "dob", "bday", "ssn",
        "passport_no", "user_email", "secret", "private_key_id", "note", "name", "value", "default", "aws_secret"]
_ASCII = st.characters(min_codepoint=9, max_codepoint=0x7E)


@pytest.mark.parametrize("hyperscan", [True, False])
@settings(max_examples=200, deadline=None)
@given(prefix=st.text(alphabet=_ASCII, max_size=60), secret=st.sampled_from(SECRETS + [""]),
       suffix=st.text(max_size=60), key=st.sampled_from(KEYS), sibling=st.sampled_from(KEYS))
def test_prefilter_never_clears_a_record_the_full_path_changes(hyperscan, prefix, secret, suffix, key, sibling):
    """Planted secrets in prose, in tool-call arguments under secret-ish keys and sibling-name pairs:
    the fast path (which skips the record when the prefilter clears it) gives the full path's record."""
    params = load_params(ROOT / "params.yaml", "redact", RedactParams)
    w = R.Worker(params, KEY)
    if not hyperscan:
        w.redactor._hs = None
    value = (prefix + secret)[-40:] or "x"
    args = {key: value, "env": [{"name": sibling, "value": suffix or "v"}], "schema": {key: {"default": value}}}
    for text in (prefix + secret + suffix, prefix + " " + secret + " " + suffix):
        rec = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": orjson.dumps(args).decode()}}]}],
            "extra": {"note": suffix, key: value}}
        fast = R.redact_fields(orjson.loads(orjson.dumps(rec)), w.redactor, None, fast=True)
        full = R.redact_fields(orjson.loads(orjson.dumps(rec)), w.redactor, None, fast=False)
        assert orjson.dumps(fast[0]) == orjson.dumps(full[0]) and fast[1] == full[1], text


def test_prefilter_clears_plain_records_and_stops_at_what_it_cannot_see():
    r = Redactor()
    clean = {"messages": [{"role": "user", "content": "Fix the failing test in src/app.py, please.\nThanks"}]}
    assert r.nothing_to_find(orjson.dumps(clean))
    for hidden in ("caf\u00e9", "a\\u0041KIA", "zero\u200bwidth", "tab\x01ctl"):  # folding, escapes, control chars
        rec = {"messages": [{"role": "user", "content": "Fix the failing test " + hidden}]}
        assert not r.nothing_to_find(orjson.dumps(rec)), hidden
    assert not Redactor(names=True).nothing_to_find(orjson.dumps(clean))  # names: always the full path


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["1", "2", "5", "0", "25", "255", "256", "127", "10", "192", "168", ".", ".", "a", "_",
                                 " ", '"', "8.8.8.8", "v1."]), max_size=24).map("".join), st.booleans())
def test_ipv4_candidate_is_the_regex_scan(text, public_only):
    """The prefilter's IPv4 check tries only the starts of digit runs; it must agree with finditer over the text."""
    from stages.detectors import _PRIVATE_V4, _PUBLIC_V4

    r = Redactor(ip_public_only=public_only, use_hyperscan=False)
    want = any(not (public_only and m.group().startswith(_PRIVATE_V4)) for m in _PUBLIC_V4.finditer(text))
    assert r._ipv4_candidate(text.encode()) == want


@pytest.mark.parametrize("hyperscan", [True, False])
def test_a_gcp_key_id_is_never_cleared(hyperscan):
    """key_value redacts any plausible value under `private_key_id` (a service-account key's id), with no other
    sign in the value: the prefilter must not clear such a record (hypothesis found `"08.8.4.4"` getting through)."""
    r = Redactor(use_hyperscan=hyperscan)
    for key in ("private_key_id", "Private_Key_ID", "gcp_private_key_id"):
        data = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "extra": {key: "08.8.4.4"}})
        assert r.key_value(key, "08.8.4.4") is not None
        assert not r.nothing_to_find(data), key
