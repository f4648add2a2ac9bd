"""The leak gate: a secret that slips past redaction (a team canary in an approved output) is found in every
artifact it reached and blocks the gate, which names file, line and detector but never the value."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import write_snapshot
from schemas.params import BuildDatasetParams, LeaksParams, RedactParams
from schemas.training import GateParams
from stages import build_dataset, gate, leaks
from stages.detectors import Redactor
from test_data_stages import run_all
from test_gate import MANIFEST, results

CANARY = "zq-canary-4471-refund-vault"  # matches no detector: only the canary list can catch it


def _approved(i: int, output: str) -> dict:
    return {"id": f"run_{i}", "created_at": f"2026-11-{1 + i % 28:02d}T10:00:00Z", "domain": "saas",
            "workflow": "refunds", "instruction": "Decide the refund.", "input_redacted": f"Order ORD-{1000 + i} late by {i} days",
            "output_approved": output, "human_review": {"status": "accepted"}, "redaction_status": "passed", "pii_level": "none"}


def _snapshot(root: Path) -> Path:
    runs = [_approved(i, f"refund {i % 7} percent") for i in range(60)]
    runs[5]["output_approved"] = f"refund approved, vault ref {CANARY}"
    return write_snapshot(root, {"approved-runs/runs.jsonl": runs})


def test_canary_that_slips_past_redaction_blocks_the_gate(tmp_path, key):
    out = run_all(_snapshot(tmp_path / "raw"), tmp_path / "w", key)
    assert CANARY in (tmp_path / "w/redact/traces.jsonl").read_text()  # redaction did not catch it...
    assert out["manifest"]["build"]["redaction_ok"] is True            # ...and neither did a scan without canaries

    canaries = leaks.Canaries([CANARY])
    scan = leaks.scan_paths([tmp_path / "w"], Redactor(), canaries, root=tmp_path / "w", workers=2)
    rep = leaks.report(scan, LeaksParams(), canaries, ["w"])
    assert rep["ok"] is False and rep["by_detector"] == {"canary": rep["hits_total"]}
    files = set(rep["by_file"])
    assert "redact/traces.jsonl" in files and "export/training-examples.jsonl" in files or \
        "export/eval-cases.jsonl" in files
    assert files & {"build_dataset/train.jsonl", "build_dataset/val.jsonl", "build_dataset/eval.jsonl"}
    for h in rep["hits"]:  # where, not what: the line really holds it
        if h["line"] > 0:
            assert CANARY in (tmp_path / "w" / h["file"]).read_text().splitlines()[h["line"] - 1]

    d = gate.decide(results(), MANIFEST, GateParams(), leaks=rep)
    assert d.is_real_improvement is True and d.promote is False and d.checks["leak_scan_ok"] is False
    reason = d.check_details["leak_scan_ok"].reason
    assert "redact/traces.jsonl:" in reason and "(canary)" in reason
    dumped = d.model_dump_json(by_alias=True) + gate.report(d, results()) + json.dumps(rep)
    assert CANARY not in dumped

    # the same canary, declared by its SHA-256 only, blocks too; and it fails the manifest's redaction_ok
    hashed = leaks.Canaries(sha256=[hashlib.sha256(CANARY.encode()).hexdigest()])
    assert leaks.scan_paths([tmp_path / "w/export"], Redactor(), hashed)["by_detector"].get("canary", 0) > 0
    res = build_dataset.build(tmp_path / "w/redact/traces.jsonl", tmp_path / "w/redact/rejects.jsonl",
                              tmp_path / "w/export", tmp_path / "w/bd2", BuildDatasetParams(min_examples=0), Redactor(),
                              hashed)
    assert build_dataset.manifest(res, BuildDatasetParams(min_examples=0), {})["build"]["redaction_ok"] is False


def test_clean_artifacts_pass_and_ignored_detectors_do_not_block(tmp_path, key):
    run_all(_snapshot(tmp_path / "raw"), tmp_path / "w", key)
    (tmp_path / "w/notes.md").write_text("ops contact: jane.roe@acme-corp.com\n")
    scan = leaks.scan_paths([tmp_path / "w"], Redactor(), leaks.Canaries(), root=tmp_path / "w")
    assert scan["hits"] == [{"file": "notes.md", "line": 1, "detector": "email"}]
    assert leaks.report(scan, LeaksParams(), leaks.Canaries(), [])["ok"] is False
    lenient = leaks.report(scan, LeaksParams(ignore_detectors=["email"]), leaks.Canaries(), [])
    assert lenient["ok"] is True and lenient["hits_total"] == 1  # still reported
    d = gate.decide(results(), MANIFEST, GateParams(), leaks=lenient)
    assert d.checks["leak_scan_ok"] is True and "ignored" in d.check_details["leak_scan_ok"].reason
    assert gate.decide(results(), MANIFEST, GateParams(), leaks=None).checks["leak_scan_ok"] is False
    off = gate.decide(results(), MANIFEST, GateParams(require_leak_scan_ok=False), leaks=scan | {"hits_failing": 1})
    assert off.promote is True and off.check_details["leak_scan_ok"].reason.startswith("not required")


def test_gate_scans_its_own_report_and_withholds_what_it_flags():
    res = results()
    res.base_model.name = f"acme/{CANARY}"  # text that reaches the report from an input
    canaries = leaks.Canaries([CANARY])

    def hit(text: str) -> set[str]:
        return leaks.scan_text(text, Redactor(), canaries)

    d = gate.decide(res, MANIFEST, GateParams(), leaks={"hits_failing": 0, "hits_total": 0, "files_scanned": 3})
    hits, _, _ = gate.self_scan(d.model_dump(mode="json", by_alias=True), gate.report(d, res), hit, "data/gate")
    assert {"file": "data/gate/gate.md", "line": 3, "detector": "canary"} in hits
    d = gate.decide(res, MANIFEST, GateParams(), leaks={"hits_failing": 0, "hits_total": 0}, self_hits=hits)
    assert d.promote is False and "data/gate/gate.md:3 (canary)" in d.check_details["leak_scan_ok"].reason
    _, dec, md = gate.self_scan(d.model_dump(mode="json", by_alias=True), gate.report(d, res), hit, "data/gate")
    assert CANARY not in md and CANARY not in json.dumps(dec)
    assert "[line withheld by the leak scan: canary]" in md
    assert dec["base_model"]["name"] == "[withheld by the leak scan: canary]"


def test_stage_cli_refuses_unknown_settings_and_missing_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a/x.jsonl").write_text(json.dumps({"t": CANARY}) + "\n")
    (tmp_path / "p.yaml").write_text(f"redact: {{canaries: [{CANARY}]}}\nleaks: {{workers: 1}}\n")
    leaks.main(["--params", "p.yaml", "--out", "out", "--scan", "a"])
    rep = json.loads((tmp_path / "out/leak_report.json").read_text())
    assert rep["hits"] == [{"file": "a/x.jsonl", "line": 1, "detector": "canary"}] and rep["scanned"] == ["a"]
    assert CANARY not in (tmp_path / "out/leak_report.json").read_text()
    with pytest.raises(SystemExit, match="nothing to scan"):
        leaks.main(["--params", "p.yaml", "--out", "out", "--scan", "a", "missing"])
    for bad in ("ignore_detectors: [canary]", "ignore_detectors: [no_such_detector]"):
        (tmp_path / "q.yaml").write_text(f"redact: {{}}\nleaks: {{{bad}}}\n")
        with pytest.raises(SystemExit, match="ignore_detectors"):
            leaks.main(["--params", "q.yaml", "--out", "out", "--scan", "a"])
    (tmp_path / "r.yaml").write_text("redact: {}\nleaks: {worker: 2}\n")
    with pytest.raises(Exception, match="worker"):
        leaks.main(["--params", "r.yaml", "--out", "out", "--scan", "a"])
