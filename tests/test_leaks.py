"""The leak scan names file, line and detector, never the value; canaries match plain or hashed."""
import hashlib
import json
import struct

from stages.detectors import Redactor
from stages.leaks import Canaries, scan_paths

CANARY = "CANARY-7f3e9a-do-not-train"


def test_leak_scan_reports_where_not_what(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"messages": [{"content": "clean"}]}) + "\n"
                                      + json.dumps({"messages": [{"content": f"mail bob@acme-corp.com {CANARY}"}]}) + "\n")
    (tmp_path / "b.md").write_text("# report\nnothing here\n")
    (tmp_path / "w.bin").write_bytes(b"\x00\x01")
    rep = scan_paths([tmp_path], Redactor(), Canaries([CANARY]), root=tmp_path)
    assert rep["files"] == 2 and rep["skipped_binary"] == 1
    assert rep["hits"] == [{"file": "a.jsonl", "line": 2, "detector": "canary"},
                           {"file": "a.jsonl", "line": 2, "detector": "email"}]
    assert CANARY not in json.dumps(rep) and "bob@" not in json.dumps(rep)


def test_hashed_canaries_match_tokens(tmp_path):
    (tmp_path / "x.md").write_text(f"the answer is {CANARY}.\n")
    digest = hashlib.sha256(CANARY.encode()).hexdigest()
    assert scan_paths([tmp_path], Redactor(), Canaries(sha256=[digest]))["by_detector"] == {"canary": 1}
    assert scan_paths([tmp_path], Redactor(), Canaries(sha256=["0" * 64]))["hits"] == []


def _safetensors(path, metadata):
    header = json.dumps({"__metadata__": metadata, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\x00" * 4)


def test_safetensors_metadata_is_scanned_and_workers_agree(tmp_path):
    _safetensors(tmp_path / "clean.safetensors", {"format": "pt"})
    _safetensors(tmp_path / "adapter.safetensors", {"note": f"trained by {CANARY}"})
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01")
    rows = [json.dumps({"a": f"line {i}" + (" ops@acme-corp.com" if i % 97 == 3 else "")}) for i in range(3000)]
    (tmp_path / "big.jsonl").write_text("\n".join(rows) + "\n")
    one = scan_paths([tmp_path], Redactor(), Canaries([CANARY]), root=tmp_path, workers=1)
    two = scan_paths([tmp_path], Redactor(), Canaries([CANARY]), root=tmp_path, workers=2)
    assert one == two
    assert {"file": "adapter.safetensors", "line": 0, "detector": "canary"} in one["hits"]
    assert {"file": "broken.safetensors", "line": 0, "detector": "unreadable_safetensors_header"} in one["hits"]
    assert not any(h["file"] == "clean.safetensors" for h in one["hits"])
    assert [h["line"] for h in one["hits"] if h["file"] == "big.jsonl"] == [i + 1 for i in range(3000) if i % 97 == 3]


def test_json_is_scanned_as_json_keyed_secrets_found_and_syntax_never_read_as_text(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(
        {"model": "x", "login": {"password": "Hunter2-xyz", "note": "mail bob@acme-corp.com"}}, indent=2))
    # a tokenizer vocabulary: `"pass": 1734` is a word and its id, not a password assignment
    (tmp_path / "tokenizer.json").write_text(json.dumps({"vocab": {"pass": 1734, "Ġpassword": 17, "token": 9}}, indent=2))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"args": {"api_key": "k_9fQ2xLm7Rt"}}) + "\n"
                                         + json.dumps({"pass": 1734}) + "\n")
    rep = scan_paths([tmp_path], Redactor(), Canaries(), root=tmp_path)
    assert [(h["file"], h["line"], h["detector"]) for h in rep["hits"]] == [
        ("cfg.json", 4, "secret_assignment"), ("cfg.json", 5, "email"), ("rows.jsonl", 1, "secret_assignment")]


def test_keyed_values_are_re_derived_from_the_artifact_structure(tmp_path):
    """A value the structure names secret (its key, a sibling name field, a schema default), also inside
    JSON text held in a string (tool-call arguments), is a hit unless it is a placeholder."""
    leaked = [
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "login",
                                                                        "arguments": json.dumps({"user": "ops", "password": "hunter2"})}}]}]},
        {"extra": {"env": [{"name": "DB_PASSWORD", "value": "pg-s3cret"}]}},
        {"tools": [{"parameters": {"properties": {"api_key": {"type": "string", "default": "k_9f8e7d6c5b"}}}}]},
    ]
    clean = [
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "login",
                                                                        "arguments": json.dumps({"password": "<PASSWORD_1>"})}}]}]},
        {"extra": {"env": [{"name": "DB_PASSWORD", "value": "<PASSWORD_2>"}, {"name": "REGION", "value": "eu-west-1"}]}},
        {"extra": {"password": "[FILTERED]", "token": "********"}},
    ]
    (tmp_path / "leaked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in leaked))
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clean))
    rep = scan_paths([tmp_path], Redactor(), Canaries(), root=tmp_path)
    assert sorted((h["file"], h["line"]) for h in rep["hits"]) == [("leaked.jsonl", 1), ("leaked.jsonl", 2), ("leaked.jsonl", 3)]
    assert "hunter2" not in json.dumps(rep)
