"""bench/openclaw.py does what openclaw-ft's build script does (so the bench's reference is honest): its three
shapes, its seven substitutions, its low-signal filter, sha256 exact dedup and a seeded split."""
from __future__ import annotations

import json

from bench.openclaw import run, scrub
from tests.conftest import write_snapshot

LONG = "here is a sufficiently long assistant answer"


def test_shapes_filters_dedup_and_split(tmp_path):
    raw = write_snapshot(tmp_path / "raw", {
        "traces/a.jsonl": [
            {"messages": [{"role": "user", "content": "mail me at jane.doe@corp.io please"},
                          {"role": "assistant", "content": LONG}]},
            {"messages": [{"role": "user", "content": "mail me at jane.doe@corp.io please"},
                          {"role": "assistant", "content": LONG}]},                      # exact duplicate
            {"conversation": [{"role": "user", "content": "short"}, {"role": "assistant", "content": LONG}]},  # low signal
            "{not json",
            {"conversations": [{"from": "human", "value": "ShareGPT is not one of its shapes"}]},  # malformed
        ],
        "synthetic/s.jsonl": [{"user": "a user turn long enough", "assistant": LONG, "source": "gen"}],
    })
    stats = run(raw, tmp_path / "out", target=10, val_ratio=0.5)
    assert stats == {"rows": 6, "selected": 2, "post_dedup": 2, "malformed": 2, "low_signal": 1}
    rows = [json.loads(line) for name in ("train.jsonl", "val.jsonl")
            for line in (tmp_path / "out" / name).read_text().splitlines()]
    assert len(rows) == 2 and {r["source"] for r in rows} == {"real", "gen"}
    text = json.dumps(rows)
    assert "jane.doe@corp.io" not in text and "<REDACTED_EMAIL>" in text
    manifest = json.loads((tmp_path / "out" / "dataset_manifest.json").read_text())
    assert manifest["qc"]["post_dedup_rows"] == 2 and manifest["build"]["val_examples"] == 1
    again = run(raw, tmp_path / "again", target=10, val_ratio=0.5)
    assert again == stats
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (tmp_path / "out" / "train.jsonl").read_bytes()


def test_its_seven_rules_and_what_they_miss():
    text = ("see https://x.io/a?b=1, ghp_" + "a" * 30 + " sk-" + "b" * 24 + " token: abcdefgh12 "
            "/home/ann/.ssh/id_rsa C:\\Users\\ann\\key.txt AKIAIOSFODNN7EXAMPLE")
    out, n = scrub([{"role": "user", "content": text}])
    assert n == 6
    for token in ("URL", "GH_TOKEN", "API_KEY", "SECRET", "PATH"):
        assert f"<REDACTED_{token}>" in out[0]["content"]
    assert "AKIAIOSFODNN7EXAMPLE" in out[0]["content"]  # an AWS key id is not among its patterns
