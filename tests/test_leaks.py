"""The leak scan names file, line and detector, never the value; canaries match plain or hashed."""
import hashlib
import json

from stages.detectors import Redactor
from stages.leaks import Canaries, scan_paths

CANARY = "CANARY-7f3e9a-do-not-train"


def test_leak_scan_reports_where_not_what(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"messages": [{"content": "clean"}]}) + "\n"
                                      + json.dumps({"messages": [{"content": f"mail bob@acme-corp.com {CANARY}"}]}) + "\n")
    (tmp_path / "b.md").write_text("# report\nnothing here\n")
    (tmp_path / "w.safetensors").write_bytes(b"\x00\x01")
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
