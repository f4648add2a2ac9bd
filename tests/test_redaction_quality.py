"""Redaction measured, not assumed: the labelled fixture (tests/fixtures/redaction/labelled.jsonl)
scored with bench/redaction.py's pure functions.

The known defects below are the real figures on the fixture (issue 4): each has a reason, and
the lists must match exactly, so a new miss or false positive fails, and so does a fixed one
(then take it off the list and raise the floors).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import redaction as rq
from bench import redaction_cases
from stages.detectors import DETECTORS

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "fixtures" / "redaction" / "labelled.jsonl"
METRICS = ROOT / "metrics" / "redaction_quality.json"

# Floors, set from the measured figures (recall 154/155 = 0.994, precision 154/166 = 0.928, F2 0.977,
# every secret gone; the one miss is a GitHub token under a PASSWORD placeholder) less a little
# slack: a backstop under the exact known-defect lists below, which fail on any single new case.
MIN_RECALL = 0.98
MIN_PRECISION = 0.90
MIN_F2 = 0.94
MIN_REMOVAL_RECALL = 0.99  # share of labelled secrets gone from the output, whatever the placeholder
# The floors count every family the shipped params find; names and street addresses only exist with
# `redact.names: true` (off in params.yaml: see README), and are scored under `with_names`.
MIN_NAMES_RECALL = 0.90
NAMES = rq.NAME_FAMILIES
# Found only from a record's structure or the team's list (params canaries), never in one fixture string.
STRUCTURAL_ONLY = {"canary"}

# case id -> why the secret is not caught (missed: leaked, or under another family's placeholder)
KNOWN_MISSES = {
    "github_token-tp-04": "a GitHub token as URL password (https://x-access-token:TOKEN@github.com/...): url_password "
                          "outranks github_token, and `token:` makes secret_assignment swallow '@github.com/org/repo.git' "
                          "too, so the whole tail becomes <PASSWORD_n> (nothing leaks; wrong kind, host and path lost)",
}
# case id -> why a benign look-alike gets (part of it) redacted
KNOWN_FALSE_POSITIVES = {
    "ds_artifactory-fp-01": "ds_artifactory: a CamelCase class name starting with AKC",
    "ds_discord-fp-01": "ds_discord: a dotted Java call whose parts are 24.6.27 chars (OrgExampleServiceLocator...)",
    "ipv4-fp-03": "ipv4: the four-part version 1.2.3.4 is a public address",
}
# benign code-like cases that may change (none today); id -> reason
KNOWN_BENIGN_CHANGED: dict[str, str] = {}


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return rq.load_cases(CASES)


@pytest.fixture(scope="module")
def measured(cases) -> tuple[list[dict], dict]:
    return rq.measure(cases)


@pytest.fixture(scope="module")
def results(measured) -> list[dict]:
    return measured[0]


@pytest.fixture(scope="module")
def metrics(measured) -> dict:
    return measured[1]


# ---------------------------------------------------------------- the fixture itself


def test_fixture_is_what_the_generator_writes():
    assert CASES.read_text(encoding="utf-8") == redaction_cases.render(redaction_cases.build()), (
        "run: .venv/bin/python -m bench.redaction_cases")


def test_fixture_size_and_shape(cases):
    assert 1000 <= len(cases) <= 2000
    assert {c["location"] for c in cases} == set(rq.LOCATIONS)
    assert sum(c["category"] == rq.BENIGN_GROUP for c in cases) >= 40


def test_every_detector_has_true_and_false_positive_vectors(cases):
    dets = [d for d in DETECTORS if d not in STRUCTURAL_ONLY]
    tp = {d: [c for c in cases if c["kind"] == "tp" and c["category"] == d] for d in dets}
    fp = {d: [c for c in cases if c["kind"] == "fp" and c["category"] == d] for d in dets}
    assert {d: len(v) for d, v in tp.items() if len(v) < 3} == {}
    assert {d: len(v) for d, v in fp.items() if len(v) < 1} == {}
    # each family's true positives sit in at least the three places of the first fixture
    assert {d: sorted({c["location"] for c in v}) for d, v in tp.items()
            if not {"message", "tool_args", "review_note"} <= {c["location"] for c in v}} == {}


def test_the_issue_10_families_sit_in_every_placement(cases):
    """Each family of families.jsonl, positives and look-alikes, in all twelve placements of a trace."""
    from bench.redaction_cases import FAMILIES

    seeds = [json.loads(line) for line in FAMILIES.read_text(encoding="utf-8").splitlines() if line.strip()]
    for fam, kind in {(d["category"], d["kind"]) for d in seeds}:
        locs = {c["location"] for c in cases if c["category"] == fam and c["kind"] == kind}
        assert locs == set(rq.LOCATIONS), (fam, kind, locs)
    fp_fams = {d["category"] for d in seeds if d["kind"] == "fp"}
    assert len(fp_fams) >= 15  # look-alikes for the new families too


def test_the_loader_rejects_a_label_that_is_not_in_the_text(tmp_path):
    bad = {"id": "x-tp-01", "category": "email", "kind": "tp", "location": "message", "text": "mail a@example.com",
           "labels": [{"category": "email", "value": "b@example.com"}], "note": ""}
    (tmp_path / "c.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(rq.FixtureError, match="not in the text"):
        rq.load_cases(tmp_path / "c.jsonl")


# ---------------------------------------------------------------- quality floors and known defects


def test_overall_recall_and_precision_floors(metrics):
    cats = {k: v for k, v in metrics["categories"].items() if k not in NAMES}
    m = rq._scores(*(sum(v[f] for v in cats.values()) for f in ("tp", "fp", "fn")))
    leaked = sum(v["leaked"] for v in cats.values())
    m["removal_recall"] = round(1 - leaked / (m["tp"] + m["fn"]), 4)
    assert m["recall"] >= MIN_RECALL, m
    assert m["precision"] >= MIN_PRECISION, m
    assert m["f2"] >= MIN_F2, m
    assert m["removal_recall"] >= MIN_REMOVAL_RECALL, m


def _names_case(case_id: str) -> bool:
    return case_id.split("-tp-")[0].split("-fp-")[0] in NAMES


def test_misses_are_exactly_the_known_ones(metrics):
    missed = {i for i in metrics["defects"]["missed"] if not _names_case(i)}
    assert {i: "NEW miss" for i in missed - KNOWN_MISSES.keys()} == {}
    assert {i: "fixed: remove from KNOWN_MISSES" for i in KNOWN_MISSES.keys() - missed} == {}


def test_false_positives_are_exactly_the_known_ones(metrics):
    fps = set(metrics["defects"]["false_positive"])
    assert {i: "NEW false positive" for i in fps - KNOWN_FALSE_POSITIVES.keys()} == {}
    assert {i: "fixed: remove from KNOWN_FALSE_POSITIVES" for i in KNOWN_FALSE_POSITIVES.keys() - fps} == {}


def test_benign_look_alikes_are_99_percent_kept(metrics):
    """Look-alike vectors and benign code-like text together: at least 99% come out unchanged."""
    v, b = metrics["fp_vectors"], metrics["benign_code"]
    assert 1 - (v["changed"] + b["changed"]) / (v["cases"] + b["cases"]) >= 0.99, (v, b)


def test_benign_code_like_text_is_never_changed(results):
    changed = {r["id"]: r["output"] for r in results if r["category"] == rq.BENIGN_GROUP and r["changed"]}
    assert {i: out for i, out in changed.items() if i not in KNOWN_BENIGN_CHANGED} == {}
    assert KNOWN_BENIGN_CHANGED.keys() <= changed.keys()


def test_no_leak_outside_tool_arguments(metrics):
    """Every labelled secret outside tool-call arguments is caught (names aside: off by default)."""
    missed = [i for i in metrics["defects"]["missed"] if not _names_case(i) and i not in KNOWN_MISSES]
    assert missed == []


def test_names_and_addresses_with_the_param_on(metrics):
    """`redact.names: true` finds >= 90% of names and street addresses and changes no benign case."""
    w = metrics["with_names"]
    for fam in NAMES:
        assert w["categories"][fam]["recall"] >= MIN_NAMES_RECALL, (fam, w["categories"][fam])
    assert w["benign_code"]["changed"] == 0


def test_redacted_tool_arguments_stay_valid_json(results):
    args = [r for r in results if r["location"] in ("tool_args", "tool_args_nested", "tool_schema", "metadata", "dict_key")]
    assert args and all(r["valid_json"] for r in args)
    for r in args:
        json.loads(r["output"])


def test_redacting_twice_changes_nothing(cases, results):
    assert [r["id"] for r in results if not r["idempotent"]] == []
    redactor = rq.make_redactor()
    for c, r in zip(cases, results):
        if r["changed"]:
            assert rq.redact_text(c["location"], r["output"], redactor)[2] == r["output"], c["id"]


def test_every_placeholder_maps_back_to_a_span(metrics):
    assert metrics["checks"] == {"invalid_json": 0, "not_idempotent": 0, "unaligned": 0}


def test_committed_metrics_are_current(metrics):
    assert METRICS.read_text(encoding="utf-8") == rq.dumps(metrics), "run: make bench-redaction"


# ---------------------------------------------------------------- the measurement can fail


@pytest.mark.parametrize("detector", [d for d in DETECTORS if d not in STRUCTURAL_ONLY])
def test_disabling_a_detector_drops_its_recall_to_zero(cases, detector):
    sub = [c for c in cases if any(lab["category"] == detector for lab in c["labels"])]
    names = True if detector in NAMES else None
    on = rq.aggregate(rq.evaluate(sub, rq.make_redactor(names=names)))["categories"][detector]
    off = rq.aggregate(rq.evaluate(sub, rq.make_redactor(disabled=[detector], names=names)))["categories"][detector]
    # Defence in depth: a value named by its key, a header or a sibling field is also caught by the
    # keyed search, so some families keep a little recall with their own detector off.
    backed = {"secret_assignment", "bearer_token", "auth_header", "person_name"}
    assert on["recall"] > 0.5 and off["recall"] <= (0.3 if detector in backed else 0.0), (on, off)


def test_a_disabled_detector_breaks_the_floor(cases):
    m = rq.aggregate(rq.evaluate(cases, rq.make_redactor(disabled=["email"])))
    assert m["categories"]["email"]["recall"] == 0.0
    assert m["micro"]["recall"] < MIN_RECALL


# ---------------------------------------------------------------- the scorer on hand-made cases


def test_recover_spans():
    assert rq.recover_spans("mail a@x.io and b@y.io", "mail <EMAIL_1> and <EMAIL_2>") == [(5, 11, "EMAIL"), (16, 22, "EMAIL")]
    assert rq.recover_spans("keep <EMAIL_1> x@y.io", "keep <EMAIL_1> <EMAIL_2>") == [(15, 21, "EMAIL")]
    assert rq.recover_spans("same", "same") == []
    assert rq.recover_spans("abc", "xyz") is None


def test_scoring_of_fp_kind_mismatch_and_leak():
    r = rq.make_redactor()
    case = lambda i, kind, text, *labels: {  # noqa: E731
        "id": i, "category": labels[0][1] if labels else "email", "kind": kind, "location": "message", "text": text,
        "labels": [{"value": v, "category": c} for v, c in labels], "note": ""}
    res = rq.evaluate([
        case("a", "tp", "mail jane@acme-mail.com", ("jane@acme-mail.com", "email")),
        case("b", "tp", "it is jane@acme-mail.com", ("jane@acme-mail.com", "phone")),  # wrong family: kind mismatch
        case("c", "tp", "phone me, code 4242", ("4242", "phone")),  # not redacted: leaked
        case("d", "fp", "write to bob@acme-mail.org"),  # a redaction in a benign case: FP
    ], r)
    m = rq.aggregate(res)
    e, p = m["categories"]["email"], m["categories"]["phone"]
    assert (e["tp"], e["fp"], e["fn"]) == (1, 1, 0) and e["precision"] == 0.5 and e["recall"] == 1.0
    assert (p["tp"], p["fn"], p["leaked"], p["kind_mismatch"]) == (0, 2, 1, 1)
    assert m["defects"] == {"missed": ["b", "c"], "false_positive": ["d"], "benign_changed": ["d"]}
    assert m["micro"]["f2"] == round(5 * (1 / 2) * (1 / 3) / (4 * (1 / 2) + 1 / 3), 4)
