"""redact -> export -> build_dataset on small snapshots, called through the pure functions."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import orjson
import pytest

from conftest import SHARED, write_snapshot
from schemas.params import BuildDatasetParams, ExportParams, RedactParams
from stages import build_dataset, export, redact
from stages.core import atomic_dir, read_jsonl
from stages.detectors import Redactor

CONTRACTS = SHARED / "contracts"

# Planted values: every category the issue names. None may reach any output.
PLANTED = {
    "email": "jane.doe@acme-corp.com",
    "phone_us": "(415) 867-5309",
    "phone_intl": "+44 20 7946 0958",
    "ssn": "123-45-6789",
    "card": "4111 1111 1111 1111",
    "iban": "DE89370400440532013000",
    "ipv4": "8.8.4.4",
    "ipv6": "2607:f8b0:4005:80a::200e",
    "aws_key": "AKIAIOSFODNN7EXAMPLE",
    "aws_secret": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "github": "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
    "gitlab": "glpat-xYz12345678901234567",
    "slack": "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "stripe": "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "openai": "sk-proj-Abcdefghijklmnopqrstuvwxyz0123456789ABCD",
    "anthropic": "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789-ABCDEFGH",
    "hf": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
    "google": "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
    "jwt": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2W\n-----END RSA PRIVATE KEY-----",
    "url_password": "hunter2secret",
    "kv_password": "Tr0ub4dor&3xyz",
    "bearer": "abcDEF123456ghiJKL789mnoPQR",
    "home": "/home/jsmith/",
    "args_password": "correct-horse-battery-9",  # only its key says it is one: {"password": ...}
}
BENIGN = ["src/stages/redact.py", "3f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39", "v2.0.0-rc1", "2026-04-25",
          "ORD-2026-00042", "$1,299.00", "get_api_key()", "https://docs.python.org/3/library/re.html", "10.0.0.5"]


def planted_snapshot(root: Path) -> Path:
    text = (f"Customer {PLANTED['email']} called from {PLANTED['phone_us']} / {PLANTED['phone_intl']}, SSN {PLANTED['ssn']}, "
            f"card {PLANTED['card']}, IBAN {PLANTED['iban']}, from {PLANTED['ipv4']} and {PLANTED['ipv6']}. "
            f"Deploy used AWS_ACCESS_KEY_ID={PLANTED['aws_key']} aws_secret_access_key={PLANTED['aws_secret']} "
            f"and token {PLANTED['github']} {PLANTED['gitlab']} {PLANTED['slack']} {PLANTED['stripe']} "
            f"{PLANTED['openai']} {PLANTED['anthropic']} {PLANTED['hf']} {PLANTED['google']} {PLANTED['jwt']}\n"
            f"{PLANTED['pem']}\nDB postgres://admin:{PLANTED['url_password']}@db.internal:5432/app password={PLANTED['kv_password']} "
            f"Authorization: Bearer {PLANTED['bearer']} log at {PLANTED['home']}project/out.log. "
            f"Benign: {' '.join(BENIGN)}")
    args = json.dumps({"email": PLANTED["email"], "note": text, "nested": {"key": PLANTED["github"]},
                       "login": {"user": "ops", "password": PLANTED["args_password"]}})
    files = {
        "approved-runs/runs.jsonl": [{
            "id": "run_1", "created_at": "2026-11-02T10:00:00Z", "domain": "saas", "workflow": "ticket_triage",
            "instruction": "Triage the ticket.", "input_redacted": text, "output_approved": "category=auth; priority=high",
            "human_review": {"status": "accepted", "review_notes": f"Removed {PLANTED['email']} and {PLANTED['aws_key']}"},
            "redaction_status": "passed", "pii_level": "none", "stable_rules": [f"Never echo {PLANTED['ssn']}"]}],
        "traces/tools.jsonl": [{
            "domain": "saas", "workflow": "ticket_triage",
            "tools": [{"type": "function", "function": {"name": "crm_lookup", "parameters": {"properties": {"email": {}}}}}],
            "messages": [{"role": "user", "content": text},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function", "function": {"name": "crm_lookup", "arguments": json.dumps(args)}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": text},
                         {"role": "assistant", "content": "category=billing; priority=low"}]}],
    }
    return write_snapshot(root, files)


def run_all(raw: Path, work: Path, key: bytes, rp=None, ep=None, bp=None) -> dict:
    rp, ep, bp = rp or RedactParams(workers=1), ep or ExportParams(), bp or BuildDatasetParams(min_examples=0)
    (work / "redact").mkdir(parents=True, exist_ok=True)
    m_r = redact.run(raw, work / "redact/traces.jsonl", work / "redact/rejects.jsonl", rp, key)
    with atomic_dir(work / "export") as tmp:
        m_e = export.export_file(work / "redact/traces.jsonl", tmp, ep)
    red = Redactor(ip_public_only=rp.ip_public_only)
    res = build_dataset.build(work / "redact/traces.jsonl", work / "redact/rejects.jsonl", work / "export",
                              work / "build_dataset", bp, red)
    man = build_dataset.manifest(res, bp, {})
    return {"redact": m_r, "export": m_e, "manifest": man}


def all_output_bytes(work: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file())


def test_planted_secrets_never_reach_an_output_and_benign_tokens_survive(tmp_path, key):
    raw = planted_snapshot(tmp_path / "raw")
    out = run_all(raw, tmp_path / "work", key)
    blob = all_output_bytes(tmp_path / "work") + json.dumps(out).encode()
    for name, value in PLANTED.items():
        for part in value.split("\n"):
            if len(part) > 6 and "PRIVATE KEY" not in part:
                assert part.encode() not in blob, f"planted {name} leaked"
    assert b"MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2W" not in blob
    traces = list(read_jsonl(tmp_path / "work/redact/traces.jsonl"))
    for value in BENIGN:
        assert any(value in json.dumps(t) for t in traces), f"benign {value} was destroyed"
    # tool-call arguments stay valid JSON, redacted value by value
    call = traces[1]["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(call)["email"].startswith("<EMAIL_")
    assert key not in blob


def test_placeholders_are_consistent_within_a_trace(tmp_path, key):
    raw = write_snapshot(tmp_path / "raw", {"traces/a.jsonl": [
        {"messages": [{"role": "user", "content": "mail a@acme-corp.com then a@acme-corp.com, cc b@acme-corp.com"},
                      {"role": "assistant", "content": "ok"}]}]})
    run_all(raw, tmp_path / "w", key)
    t = next(read_jsonl(tmp_path / "w/redact/traces.jsonl"))
    assert t["messages"][0]["content"] == "mail <EMAIL_1> then <EMAIL_1>, cc <EMAIL_2>"


def test_ids_are_keyed_hashes(tmp_path, key):
    import hashlib
    raw = write_snapshot(tmp_path / "raw", {"approved-runs/a.jsonl": [
        json.loads(l) for l in open(CONTRACTS / "agentic-stack/approved-runs.redacted.jsonl")]})
    run_all(raw, tmp_path / "w1", key)
    run_all(raw, tmp_path / "w2", b"another-key-0123456789abcdef")
    t1 = [t["id"] for t in read_jsonl(tmp_path / "w1/redact/traces.jsonl")]
    t2 = [t["id"] for t in read_jsonl(tmp_path / "w2/redact/traces.jsonl")]
    assert t1 != t2, "the id depends on the key"
    blob = all_output_bytes(tmp_path / "w1")
    assert b"run_real_estate_lead_001" not in blob
    for plain in (hashlib.sha256(b"run_real_estate_lead_001").hexdigest(), hashlib.md5(b"run_real_estate_lead_001").hexdigest()):
        assert plain[:16].encode() not in blob


HOSTILE = {
    "traces/hostile.jsonl": [
        b'{"messages": [{"role": "user", "content": "trunc',
        b"[1, 2, 3]",
        b'{"messages": "not a list"}',
        b'{"messages": [{"role": "user", "content": "x"}], "v": NaN}',
        b'{"messages": [{"role": "user", "content": "x"}], "v": Infinity}',
        b"\xff\xfe\x00garbage",
        b'{"user": "hi", "assistant": "' + b"A" * 2_100_000 + b'"}',
        b'{"id": "dup", "user": "one", "assistant": "first answer"}',
        b'{"id": "dup", "user": "two", "assistant": "second answer"}',
        b'{"domain": "../x", "workflow": "../../etc", "user": "escape?", "assistant": "no"}',
        b'{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
        b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}',
        b"",
        b"   ",
    ],
    "traces/bom.jsonl": [b'\xef\xbb\xbf{"user": "bom first line", "assistant": "fine"}'],
    "traces/empty.jsonl": [],
    "traces/blank.jsonl": [b"", b"   ", b"\t", b""],
    "elsewhere/stray.jsonl": [b"{}"],
}


def test_hostile_input_is_counted_never_crashes(tmp_path, key):
    raw = write_snapshot(tmp_path / "raw", HOSTILE)
    (raw / "traces/zero.jsonl").write_bytes(b"")
    out = run_all(raw, tmp_path / "w", key, rp=RedactParams(workers=1, max_line_bytes=1_000_000))
    m = out["redact"]
    assert m["rejects_by_reason"] == {"duplicate_id": 1, "invalid_json": 3, "invalid_utf8": 1, "line_too_long": 1,
                                      "not_an_object": 1, "unknown_folder": 1, "wrong_type": 1}
    rejects = list(read_jsonl(tmp_path / "w/redact/rejects.jsonl"))
    assert all(r["file"] and r["line"] >= 0 and r["reason"] for r in rejects)
    dup = [r for r in rejects if r["reason"] == "duplicate_id"][0]
    assert dup["line"] == 9 and "traces/hostile.jsonl:8" in dup["detail"]
    assert m["blank_lines"] == 2 + 4 and m["traces"] == 5
    filtered = out["manifest"]["filtered_by_reason"]
    assert filtered.get("role_order", 0) + filtered.get("eval_role_order", 0) == 1
    assert filtered.get("empty_turn", 0) + filtered.get("eval_empty_turn", 0) == 1
    assert out["manifest"]["accounting"]["ok"]
    # names from the data never address a path outside the outputs
    written = [p for p in (tmp_path / "w").rglob("*")]
    assert all((tmp_path / "w") in p.parents for p in written)
    assert not (tmp_path / "x").exists() and not (tmp_path / "etc").exists()


def test_export_artifacts_validate_against_agentic_stack_schemas(tmp_path, key):
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    raw = tmp_path / "raw"
    import shutil
    shutil.copytree(Path(__file__).parents[1] / "examples/snapshot", raw)
    run_all(raw, tmp_path / "w", key)
    exp = tmp_path / "w/export"
    schema = lambda n: json.loads((CONTRACTS / f"agentic-stack/{n}.schema.json").read_text())
    checks = [("trace-records.jsonl", "trace-record"), ("training-examples.jsonl", "training-example"),
              ("eval-cases.jsonl", "eval-case")]
    for fname, sname in checks:
        v = jsonschema.Draft202012Validator(schema(sname), format_checker=jsonschema.FormatChecker())
        rows = list(read_jsonl(exp / fname))
        assert rows, fname
        for r in rows:
            v.validate(r)
    cards = json.loads((exp / "context-cards.json").read_text())
    for c in cards:
        jsonschema.validate(c, schema("context-card"))
        assert (exp / "context-cards" / c["domain"] / f"{c['workflow']}.md").exists()
    jsonschema.validate(json.loads((exp / "flywheel-metrics.json").read_text()), schema("flywheel-metrics"))
    # eval cases and training examples never share a trace
    ev = {t for r in read_jsonl(exp / "eval-cases.jsonl") for t in r["source_trace_ids"]}
    tr = {t for r in read_jsonl(exp / "training-examples.jsonl") for t in r["metadata"]["source_trace_ids"]}
    assert ev and tr and not ev & tr
    # rules from rejected runs never reach a card
    all_rules = " ".join(r for c in cards for r in c["stable_rules"])
    rejected_rules = {r for t in read_jsonl(tmp_path / "w/redact/traces.jsonl") if t["review"]["status"] == "rejected"
                      for r in t["extra"].get("stable_rules", [])}
    approved_rules = {r for t in read_jsonl(tmp_path / "w/redact/traces.jsonl") if t["review"]["status"] in ("accepted", "edited")
                      for r in t["extra"].get("stable_rules", [])}
    leaked = {r for r in rejected_rules - approved_rules if r in all_rules}
    assert rejected_rules and not leaked


def test_build_dataset_manifest_carries_openclaw_fields_and_accounting(tmp_path, key):
    import shutil
    raw = tmp_path / "raw"
    shutil.copytree(Path(__file__).parents[1] / "examples/snapshot", raw)
    out = run_all(raw, tmp_path / "w", key)
    man = out["manifest"]
    theirs = json.loads((CONTRACTS / "openclaw-ft/dataset_manifest.example.json").read_text())

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) and k not in ("ratios", "category_counts", "outcome_counts") for x in keys(v, prefix + k + ".")}
    assert keys(theirs) <= keys(man)
    acc = man["accounting"]
    # a session file's events are one record (one trace) from here on
    assert acc["ok"] and acc["raw_records"] == out["redact"]["records"] - out["redact"]["session_lines_merged"]
    assert man["build"]["redaction_ok"] is True
    assert man["duplicates"]["exact"] > 0 and man["duplicates"]["near"] > 0
    b = tmp_path / "w/build_dataset"
    train = list(read_jsonl(b / "train.jsonl"))
    val = list(read_jsonl(b / "val.jsonl"))
    ev = list(read_jsonl(b / "eval.jsonl"))
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in val} | {r["id"] for r in ev})
    for r in train[:5]:
        assert set(r) >= {"source", "messages", "domain", "workflow", "id"}


def test_split_is_stable_when_traces_are_added(tmp_path, key):
    import shutil
    raw = tmp_path / "raw"
    shutil.copytree(Path(__file__).parents[1] / "examples/snapshot", raw)
    bp = BuildDatasetParams(min_examples=0)
    first = run_all(raw, tmp_path / "a", key, bp=bp)["manifest"]
    assert "traces/day2.jsonl" not in first["traces_by_file"]
    write_snapshot(raw, {"traces/day2.jsonl": [
        {"domain": "saas", "workflow": "ticket_triage", "created_at": "2026-12-01T00:00:00Z",
         "messages": [{"role": "user", "content": f"New day ticket {i}: the quarterly widget {i} export is broken in region {i * 7}"},
                      {"role": "assistant", "content": "category=bug; priority=medium"}]} for i in range(40)]})
    before = run_all(raw, tmp_path / "b", key, bp=bp)["manifest"]
    assert before["traces_by_file"]["traces/day2.jsonl"] == 40, "the manifest says what was added"

    def split_of(d):
        return {r["id"]: s for s in ("train", "val") for r in read_jsonl(d / f"build_dataset/{s}.jsonl")}
    a, b = split_of(tmp_path / "a"), split_of(tmp_path / "b")
    moved = [k for k in a if k in b and a[k] != b[k]]
    assert not moved
    assert set(a) <= set(b), "no earlier example dropped by adding new, distinct ones"
    assert 0 < len(set(b) - set(a)) <= 40
    rows_b = {r["id"]: r for s in ("train", "val") for r in read_jsonl(tmp_path / f"b/build_dataset/{s}.jsonl")}
    new_texts = [json.dumps(rows_b[k]["messages"]) for k in set(b) - set(a)]
    assert all("New day ticket" in t for t in new_texts), "only the added day's examples are new"
    assert before["accounting"]["raw_records"] == first["accounting"]["raw_records"] + 40


def test_outputs_are_byte_identical_across_runs(tmp_path, key):
    import shutil
    raw = tmp_path / "raw"
    shutil.copytree(Path(__file__).parents[1] / "examples/snapshot", raw)
    run_all(raw, tmp_path / "a", key, rp=RedactParams(workers=2))
    run_all(raw, tmp_path / "b", key, rp=RedactParams(workers=1))
    fa = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    fb = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert fa == fb


def test_structural_keys_do_not_shield_values(tmp_path, key):
    args = {"id": "jane.doe@acme-corp.com", "role": "+44 20 7946 0958", "type": {"name": "AKIAIOSFODNN7EXAMPLE"}}
    raw = write_snapshot(tmp_path / "raw", {"traces/a.jsonl": [{"messages": [
        {"role": "user", "content": "look up"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "crm_lookup", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{}"},
        {"role": "assistant", "content": "done"}]}]})
    run_all(raw, tmp_path / "w", key)
    blob = all_output_bytes(tmp_path / "w")
    for v in ("jane.doe@acme-corp.com", "7946 0958", "AKIAIOSFODNN7EXAMPLE"):
        assert v.encode() not in blob
