"""Typed hand-offs: every file one stage writes and another reads is read back through its model in schemas/
(core.read_model / core.read_models), on real outputs: the data stages' on the example snapshot, the model half's
on conftest's tiny task; and the rule that decides which of two near duplicates survives."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import jsonschema
import pytest

from conftest import TEST_KEY, write_snapshot
from schemas.params import BuildDatasetParams, ExportParams, RedactParams
from schemas.records import (ContextCard, DatasetManifest, EvalCase, Exclusion, FlywheelMetrics, LeakReport, Reject,
                             SplitRow, Trace, TraceRecord, TrainingExample)
from schemas.training import (AdapterManifest, BaseManifest, EvalResults, GateDecision, Prediction, TrainMetrics)
from stages import build_dataset, export, redact
from stages.core import atomic_dir, read_json, read_model, read_models, write_json, write_jsonl
from stages.detectors import Redactor

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ROOT.parent / "shared" / "contracts" / "agentic-stack"

# Every output file of the three data stages -> its model (a new file without one fails the test).
MODELS = {
    "redact/traces.jsonl": Trace, "redact/rejects.jsonl": Reject,
    "export/trace-records.jsonl": TraceRecord, "export/training-examples.jsonl": TrainingExample,
    "export/eval-cases.jsonl": EvalCase,
    "build_dataset/train.jsonl": SplitRow, "build_dataset/val.jsonl": SplitRow, "build_dataset/eval.jsonl": SplitRow,
    "build_dataset/excluded.jsonl": Exclusion, "build_dataset/dataset_manifest.json": DatasetManifest,
    "export/flywheel-metrics.json": FlywheelMetrics,
}
CONTRACT_SCHEMAS = {"export/trace-records.jsonl": "trace-record", "export/training-examples.jsonl": "training-example",
                    "export/eval-cases.jsonl": "eval-case"}


def _pipeline(raw: Path, work: Path, ep: ExportParams | None = None, bp: BuildDatasetParams | None = None) -> dict:
    (work / "redact").mkdir(parents=True, exist_ok=True)
    redact.run(raw, work / "redact/traces.jsonl", work / "redact/rejects.jsonl", RedactParams(workers=1), TEST_KEY)
    with atomic_dir(work / "export") as tmp:
        export.export_file(work / "redact/traces.jsonl", tmp, ep or ExportParams())
    bp = bp or BuildDatasetParams(min_examples=0)
    res = build_dataset.build(work / "redact/traces.jsonl", work / "redact/rejects.jsonl", work / "export",
                              work / "build_dataset", bp, Redactor())
    man = build_dataset.manifest(res, bp, {})
    write_json(work / "build_dataset/dataset_manifest.json", man)
    return man


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("handoffs")
    shutil.copytree(ROOT / "examples/snapshot", tmp / "raw")
    _pipeline(tmp / "raw", tmp / "w")
    return tmp / "w"


def test_every_handed_on_file_reads_back_through_its_model(work):
    files = {p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()}
    jsonl = {f for f in files if f.endswith(".jsonl")}
    assert jsonl <= set(MODELS), f"no model for {sorted(jsonl - set(MODELS))}"
    for name, model in MODELS.items():
        if name.endswith(".jsonl"):
            rows = list(read_models(work / name, model))
            lines = (work / name).read_bytes().count(b"\n")
            assert len(rows) == lines and (lines > 0 or name == "redact/rejects.jsonl"), name
        else:
            read_model(work / name, model)
    cards = read_json(work / "export/context-cards.json")
    assert cards and all(ContextCard.model_validate(c) for c in cards)


def test_export_still_validates_against_agentic_stack(work):
    for name, schema in CONTRACT_SCHEMAS.items():
        sch = json.loads((CONTRACTS / f"{schema}.schema.json").read_text())
        for line in open(work / name):
            jsonschema.validate(json.loads(line), sch)
    ex = json.loads(open(work / "export/training-examples.jsonl").readline())
    # the conversation is not repeated: it is the trace the example names
    assert "messages" not in ex["metadata"] and set(ex["metadata"]) >= {"bucket", "source", "outcome"}


# The model half's files (conftest's model_half: base and train in run/, eval, leaks and gate in e2e/) -> model.
MODEL_HALF = {
    "run/data/base/model.json": BaseManifest, "run/data/train/model.json": AdapterManifest,
    "run/metrics/train.json": TrainMetrics, "e2e/data/eval/predictions.jsonl": Prediction,
    "e2e/data/eval/eval_results.json": EvalResults, "e2e/data/leaks/leak_report.json": LeakReport,
    "e2e/data/gate/gate_decision.json": GateDecision,
}


def test_the_model_half_hands_on_typed_files(model_half, tmp_path):
    """Each file reads back through its model, and the model describes all of it: dumped again, it gives the
    file's own bytes (so nothing is written beside the model)."""
    got = {}
    for name, model in MODEL_HALF.items():
        where, rel = name.split("/", 1)
        path = model_half[where] / rel
        again = tmp_path / path.name
        if rel.endswith(".jsonl"):
            got[name] = rows = list(read_models(path, model))
            write_jsonl(again, (r.model_dump(mode="json", by_alias=True, exclude_unset=True) for r in rows))
            assert rows and len(rows) == path.read_bytes().count(b"\n"), name
        else:
            got[name] = obj = read_model(path, model)
            write_json(again, obj.model_dump(mode="json", by_alias=True, exclude_unset=True))
        assert again.read_bytes() == path.read_bytes(), name
    adapter, res = got["run/data/train/model.json"], got["e2e/data/eval/eval_results.json"]
    # the identities each stage carries on are the ones the stage before it wrote
    assert adapter.base_model.weights_digest == got["run/data/base/model.json"].weights_digest
    assert res.adapter_digest == adapter.adapter_digest == got["run/metrics/train.json"].adapter_digest
    assert res.base_model == adapter.base_model == got["e2e/data/gate/gate_decision.json"].base_model
    assert res.dataset_digest == adapter.dataset_digest and len(got["e2e/data/eval/predictions.jsonl"]) == 2 * res.n


def test_a_bad_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "excluded.jsonl"
    path.write_text('{"trace_id": "a", "reason": "x"}\n{"trace_id": "b"}\n')
    with pytest.raises(ValueError, match=r"excluded.jsonl:2: not a valid Exclusion"):
        list(read_models(path, Exclusion))


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "iota",
                                "lambda", "rho", "tau", "phi", "psi", "chi"]) + str(rng.randrange(50)) for _ in range(n))


def _run(created: str, text: str, i: int) -> dict:
    return {"id": f"run_{i}", "created_at": created, "domain": "ops", "workflow": "summarise",
            "instruction": "Summarise the incident.", "input_redacted": text, "output_approved": "ok: " + text[:40],
            "human_review": {"status": "accepted"}, "redaction_status": "passed", "pii_level": "none"}


def test_the_older_of_two_near_duplicates_survives_as_data_grows(tmp_path):
    """Near dedup takes the pool in (created_at, row id) order: the older trace survives whatever the ids, so
    a survivor in today's split stays the survivor when newer near copies arrive (export carries created_at)."""
    rng = random.Random(7)
    pairs = []
    for i in range(8):
        text = _words(rng, 120)
        pairs.append((_run(f"2026-01-{i + 1:02d}T00:00:00Z", text, 2 * i),  # old
                      _run(f"2026-06-{i + 1:02d}T00:00:00Z", text + " !", 2 * i + 1)))  # new: the same words
    ep = ExportParams(eval_share=0.0)
    bp = BuildDatasetParams(min_examples=0, ratios={"real": 1.0}, target_examples=100, val_ratio=0.0)
    old_only = write_snapshot(tmp_path / "raw1", {"approved-runs/a.jsonl": [o for o, _ in pairs]})
    both = write_snapshot(tmp_path / "raw2", {"approved-runs/a.jsonl": [x for p in pairs for x in p]})
    _pipeline(old_only, tmp_path / "w1", ep, bp)
    man = _pipeline(both, tmp_path / "w2", ep, bp)
    assert man["duplicates"]["near"] == len(pairs)
    created = {t.id: t.created_at for t in read_models(tmp_path / "w2/redact/traces.jsonl", Trace)}
    dropped = [e for e in read_models(tmp_path / "w2/build_dataset/excluded.jsonl", Exclusion) if e.reason == "dedup_near"]
    assert len(dropped) == len(pairs) and all(created[e.trace_id].startswith("2026-06") for e in dropped)
    rows1 = (tmp_path / "w1/build_dataset/train.jsonl").read_bytes()
    assert rows1 and (tmp_path / "w2/build_dataset/train.jsonl").read_bytes() == rows1  # the same survivors
    survivors = {r.id for r in read_models(tmp_path / "w1/build_dataset/train.jsonl", SplitRow)}
    assert {e.survivor for e in dropped} == survivors
    ex = [e.metadata for e in read_models(tmp_path / "w2/export/training-examples.jsonl", TrainingExample)]
    assert all(m.created_at and m.created_at.startswith("2026-") for m in ex)
