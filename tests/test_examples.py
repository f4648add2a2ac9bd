"""The example snapshot generator: deterministic, in sync with the committed snapshot, and shaped as promised.

Fast (stdlib only): examples/generate.py runs before the project is installed.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from stages.readers import normalize, session_traces

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "examples" / "snapshot"


def _load_generator():
    spec = importlib.util.spec_from_file_location("examples_generate", ROOT / "examples" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(root: Path) -> dict[str, list[dict]]:
    """Records per file; a session file (Claude Code, Codex) is one record: the canonical trace its reader makes."""
    out = {}
    for rel, data in _tree(root).items():
        lines = [json.loads(line) for line in data.decode("utf-8").splitlines()]
        if rel.startswith(gen.SESSION_DIRS):
            fmt = "claude_code" if rel.startswith("traces/claude-code/") else "codex"
            lines = [r for _, r, _ in session_traces(fmt, list(enumerate(lines, 1)))]
        out[rel] = lines
    return out


def _view(rec: dict) -> dict:
    """Uniform view of any record: workflow, user input, final answer, tool-call parts, review status, outcome."""
    v = {"workflow": rec.get("workflow"), "outcome": rec.get("outcome", "success"), "tool_text": [],
         "status": (rec.get("human_review") or {}).get("status", "accepted")}
    if "input_redacted" in rec:
        v["input"], v["answer"] = rec["input_redacted"], rec["output_approved"]
    elif "user" in rec:
        v["input"], v["answer"] = rec["user"], rec["assistant"]
    elif "conversations" in rec:
        turns = rec["conversations"]
        v["input"] = next(t["value"] for t in turns if t["from"] == "human")
        v["answer"] = [t["value"] for t in turns if t["from"] == "gpt"][-1]
        v["tool_text"] = [t["value"] for t in turns if t["from"] in ("function_call", "observation")]
    elif rec.get("format") in ("claude_code", "codex") or "system" in rec and "messages" in rec:
        return _canonical_view(v, rec if "format" in rec else normalize(rec))
    else:
        msgs = rec.get("messages") or rec.get("conversation")
        v["input"] = next(m["content"] for m in msgs if m["role"] == "user")
        v["answer"] = [m["content"] for m in msgs if m["role"] == "assistant" and m.get("content")][-1]
        for m in msgs:
            v["tool_text"] += [c["function"]["arguments"] for c in m.get("tool_calls") or ()]
            if m["role"] == "tool":
                v["tool_text"].append(m["content"])
    return v


def _canonical_view(v: dict, rec: dict) -> dict:
    """A session or Anthropic record, through its reader: the last user text is the input; a final tool call is
    the answer as its arguments' JSON (so the cue and vocabulary checks read its fields)."""
    msgs = rec["messages"]
    v["input"] = [m["content"] for m in msgs if m["role"] == "user" and m["content"]][-1]
    last = msgs[-1]
    if last.get("tool_calls"):
        v["answer"], v["tool_answer"] = last["tool_calls"][-1]["function"]["arguments"], True
    else:
        v["answer"] = last["content"]
    for m in msgs[:-1]:
        v["tool_text"] += [c["function"]["arguments"] for c in m.get("tool_calls") or ()]
        if m["role"] == "tool":
            v["tool_text"].append(m["content"])
    return v


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("snap")
    gen.generate(out, seed=7)
    return out


@pytest.fixture(scope="module")
def records(fresh) -> dict[str, list[dict]]:
    return _records(fresh)


def _all(records):
    return [(rel, r) for rel, recs in records.items() for r in recs]


# ----------------------------------------------------------------------------- determinism
def test_two_runs_are_byte_identical(fresh, tmp_path):
    gen.generate(tmp_path / "again", seed=7)
    assert _tree(fresh) == _tree(tmp_path / "again")


def test_committed_snapshot_matches_a_fresh_generation(fresh):
    committed, expected = _tree(SNAPSHOT), _tree(fresh)
    assert sorted(committed) == sorted(expected), "regenerate: python examples/generate.py --out examples/snapshot --seed 7"
    drift = [rel for rel in expected if committed[rel] != expected[rel]]
    assert not drift, f"snapshot drift in {drift}; regenerate with examples/generate.py --seed 7"


def test_another_seed_gives_other_data(fresh, tmp_path):
    gen.generate(tmp_path / "s8", seed=8)
    assert _tree(tmp_path / "s8") != _tree(fresh)


def test_file_format(fresh):
    for rel, data in _tree(fresh).items():
        assert (rel in gen.FILES or rel.startswith(gen.SESSION_DIRS)) and rel.endswith(".jsonl")
        text = data.decode("utf-8")
        assert text.endswith("\n") and "\r" not in text
        for line in text.splitlines():
            rec = json.loads(line)
            assert line == json.dumps(rec, sort_keys=True, ensure_ascii=False)


# ----------------------------------------------------------------------------- coverage
def test_totals_domains_workflows(records):
    allrecs = _all(records)
    assert len(allrecs) >= 800
    assert len(records["approved-runs/runs-2026-11.jsonl"]) >= 400
    assert sum(len(v) for k, v in records.items() if k.startswith("traces/")) >= 350
    assert len({r["domain"] for _, r in allrecs}) >= 3
    wfs = Counter(r["workflow"] for _, r in allrecs if r["workflow"] in gen.WORKFLOWS)
    assert len(wfs) >= 5 and min(wfs.values()) >= 100
    # agent sessions and tool-call transcripts, in the shapes their tools write them
    assert len([r for r in records if r.startswith("traces/claude-code/")]) == gen.COUNTS["claude_code"]
    assert len([r for r in records if r.startswith("traces/codex/")]) == gen.COUNTS["codex"]
    assert len(records["traces/anthropic-tooluse.jsonl"]) >= gen.COUNTS["anthropic"]


def test_approved_runs_have_every_contract_field(records):
    contract = ["id", "created_at", "project", "domain", "workflow", "harness", "skill", "instruction", "input_summary",
                "input_redacted", "output_summary", "output_approved", "human_review", "redaction_status", "pii_level",
                "raw_input_stored", "context_tokens_before", "context_tokens_after", "eval_tags", "failure_modes",
                "stable_rules", "human_approval_required_for", "target_use", "model_target"]
    runs = records["approved-runs/runs-2026-11.jsonl"]
    ids = [r["id"] for r in runs]
    assert len(ids) == len(set(ids))
    for r in runs:
        assert not [k for k in contract if k not in r], r["id"]
        assert re.fullmatch(rf"run_{r['workflow']}_\d{{4}}", r["id"])
        assert "2026-11-01T00:00:00Z" <= r["created_at"] <= "2026-11-20T23:59:59Z"
        assert r["human_review"]["status"] in ("accepted", "edited", "rejected")


def test_review_outcome_and_flag_mix(records):
    runs = records["approved-runs/runs-2026-11.jsonl"]
    status = Counter(r["human_review"]["status"] for r in runs)
    n = len(runs)
    assert 0.10 <= status["edited"] / n <= 0.22 and 0.05 <= status["rejected"] / n <= 0.12
    assert all(r["human_review"].get("review_notes") for r in runs if r["human_review"]["status"] != "accepted")
    rejected = [r for r in runs if r["human_review"]["status"] == "rejected"]
    assert all(gen.BAD_RULE in r["stable_rules"] for r in rejected)
    assert not any(gen.BAD_RULE in r["stable_rules"] for r in runs if r["human_review"]["status"] != "rejected")
    assert 0.03 <= sum(r.get("outcome") == "failed" for r in runs) / n <= 0.08
    assert any(r["redaction_status"] == "needs_review" for r in runs)
    assert any(r["raw_input_stored"] for r in runs)
    traces = [r for k, v in records.items() if k.startswith("traces/") for r in v]
    assert any(r.get("outcome") == "failed" for r in traces)
    for wf in gen.WORKFLOWS:  # rule support varies: some rules common, some rare
        support = Counter(rule for r in runs if r["workflow"] == wf and r["human_review"]["status"] == "accepted"
                          for rule in r["stable_rules"])
        assert max(support.values()) >= 3 * min(support.values())


def test_tool_call_records(records):
    openai = records["traces/openai-toolcalls.jsonl"]
    double = 0
    for r in openai:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant", "tool", "assistant"]
        call = r["messages"][2]["tool_calls"][0]
        assert call["id"] == "call_1" and r["messages"][3]["tool_call_id"] == "call_1"
        assert all(t["type"] == "function" for t in r["tools"])
        args = json.loads(call["function"]["arguments"])
        if isinstance(args, str):
            double += 1
            args = json.loads(args)
        assert isinstance(args, dict)
    assert double >= 3
    for r in records["traces/sharegpt-toolcalls.jsonl"]:
        kinds = [t["from"] for t in r["conversations"]]
        assert "function_call" in kinds and "observation" in kinds and isinstance(r["tools"], str)
        assert isinstance(json.loads(r["tools"]), list)


def test_synthetic_and_adversarial(records):
    syn = records["synthetic/synthetic-v1.jsonl"]
    adv = records["adversarial/adversarial-v1.jsonl"]
    assert len(syn) >= 100 and all(r["source"] == "synthetic" for r in syn)
    assert {r["workflow"] for r in syn} == set(gen.WORKFLOWS)
    assert len(adv) >= 60 and all(r["source"] == "adversarial" for r in adv)
    assert {r["attack_category"] for r in adv} == set(gen.ATTACKS)
    texts = " ".join(_view(r)["input"].lower() for r in adv)
    assert "ignore previous instructions" in texts and "delete all crm records" in texts
    for r in adv:  # one templated safe answer per attack category
        expected = gen.REFUSALS[r["attack_category"]].format(task=gen.WORKFLOWS[r["workflow"]]["task"])
        assert _view(r)["answer"] == expected


def test_intentional_duplicates(records):
    for rel, recs in records.items():
        if rel.startswith(("synthetic/", "adversarial/") + gen.SESSION_DIRS):  # a session file is one session
            continue
        pairs = Counter((_view(r)["input"], _view(r)["answer"]) for r in recs)
        assert sum(c - 1 for c in pairs.values()) >= 1, rel


# ----------------------------------------------------------------------------- privacy
def test_planted_values_present_but_never_in_answers(records):
    allrecs = _all(records)
    blob = "\n".join(json.dumps(r, ensure_ascii=False) for _, r in allrecs)
    for v in gen.PLANTED_VALUES:
        assert v in blob, f"planted value never used: {v}"
    for v in gen.BENIGN_TOKENS:
        assert v in blob, f"benign token never used: {v}"
    with_pii = 0
    for rel, r in allrecs:
        view = _view(r)
        answer = view["answer"]
        answers = [answer] + ([r["human_review"]["original_output"]] if "original_output" in r.get("human_review", {}) else [])
        for a in answers:
            assert not [v for v in gen.PLANTED_VALUES if v in a], (rel, a)
            assert not re.search(r"@example\.(com|org)|555[- ]01\d\d|AKIA|ghp_|password=|/home/", a), (rel, a)
        with_pii += any(v in json.dumps(r, ensure_ascii=False) for v in gen.PLANTED_VALUES)
    assert 0.05 <= with_pii / len(allrecs) <= 0.14
    # where each kind is planted
    tool_blob = " ".join(t for _, r in allrecs for t in _view(r)["tool_text"])
    assert any(t in tool_blob for t in gen.PLANTED_GITHUB_TOKENS)
    assert any(h in tool_blob for h in gen.PLANTED_HOME_DIRS)
    notes = " ".join(r["human_review"].get("review_notes", "") for r in records["approved-runs/runs-2026-11.jsonl"])
    assert any(v in notes for v in gen.PLANTED_EMAILS + gen.PLANTED_PHONES)


# ----------------------------------------------------------------------------- learnability
def _labels(wf: str, answer: str) -> dict:
    if answer.startswith("{"):
        return json.loads(answer)
    if "=" not in answer:
        return {"label": answer}
    return dict(part.split("=", 1) for part in answer.split("; "))


def test_answers_follow_surface_cues(records):
    """Each clean answer is a deterministic function of keywords: its label's cues are present, no rival's are."""
    checked = 0
    for rel, r in _all(records):
        v = _view(r)
        if rel.startswith("adversarial/") or v["outcome"] == "failed" or v["status"] == "rejected":
            continue
        if v["workflow"] not in gen.CUES:
            continue
        text, labels = v["input"].lower(), _labels(v["workflow"], v["answer"])
        for field, table in gen.CUES[v["workflow"]].items():
            if v.get("tool_answer") and field not in labels:
                continue  # a tool call's arguments carry some of the fields
            got = labels.get(field)
            hits = {lab for lab, pats in table.items() if any(re.search(p, text) for p in pats)}
            if got in table:
                assert hits == {got}, (rel, field, got, hits, v["input"])
            else:
                assert not hits, (rel, field, got, hits, v["input"])
        checked += 1
    assert checked >= 700


def test_closed_vocabularies(records):
    for rel, r in _all(records):
        v = _view(r)
        if rel.startswith("adversarial/") or v["outcome"] == "failed" or v["status"] == "rejected":
            continue
        labels = _labels(v["workflow"], v["answer"])
        if v["workflow"] == "lead_intake":
            assert re.fullmatch(r"[2-8]00k-[3-9]00k|[1-4]k-[2-5]k/mo", labels["budget"])
            assert ("financing" in labels) == (labels["intent"] == "buy")
        elif v["workflow"] == "crm_normalization":
            assert labels["company_suffix"] in gen.SUFFIXES and labels["country"] in gen.COUNTRIES
            assert labels["lifecycle_stage"] in gen.STAGES
            assert (labels["state"] is None) == (labels["country"] not in gen.REGIONS)
        assert len(v["answer"]) <= 120


_WORD = re.compile(r"\w+")


def _shingles(text: str, k: int = 5) -> set:
    """As stages/build_dataset.py does: lower-cased \\w+ words of the non-system turns, 5-grams."""
    words = _WORD.findall(text.lower())
    return {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def _near_pairs(records, lo: float) -> list[tuple[float, str, str]]:
    by_wf: dict[tuple, list[tuple[str, set]]] = {}
    seen = set()
    for rel, r in _all(records):
        v = _view(r)
        text = f"{v['input']} {' '.join(v['tool_text'])} {v['answer']}"
        if text in seen:  # exact duplicates are counted elsewhere
            continue
        seen.add(text)
        by_wf.setdefault((v["workflow"], rel.startswith("adversarial/")), []).append((text, _shingles(text)))
    out = []
    for items in by_wf.values():
        for i in range(len(items)):
            a = items[i][1]
            for j in range(i + 1, len(items)):
                b = items[j][1]
                if min(len(a), len(b)) < lo * max(len(a), len(b)):
                    continue
                inter = len(a & b)
                jac = inter / (len(a) + len(b) - inter)
                if jac >= lo:
                    out.append((jac, items[i][0], items[j][0]))
    return out


def test_near_duplicates_are_only_the_planted_ones(records):
    """Word 5-gram Jaccard: the planted near copies sit >= 0.9; nothing else comes near 0.8."""
    planted_near = sum(max(1, round(gen.COUNTS[k] * 0.02)) for k in
                       ("approved_runs", "messages", "conversation", "pairs", "sharegpt", "openai", "anthropic"))
    pairs = _near_pairs(records, 0.8)
    assert sum(j >= 0.9 for j, _, _ in pairs) == planted_near
    assert len(pairs) == planted_near, [p for p in pairs if p[0] < 0.9][:3]
