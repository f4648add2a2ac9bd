"""export: redacted traces -> agentic-stack artifacts (trace records, training examples, eval
cases, context cards, flywheel metrics) in one fixed folder, swapped in atomically.

Unlike the exporter it replaces: cards use approved runs only and keep a rule only with enough
support; eval cases are a hash share per workflow, never also training examples; no wall clock.
"""
from __future__ import annotations

import argparse
from array import array
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, get_args

import orjson

from schemas.params import ExportParams
from schemas.records import Bucket, ContextCard, EvalCase, FlywheelMetrics, Outcome, TraceRecord, TrainingExample
from stages.chat import answer, instruction_of, prompt_messages, render, render_tool_call
from stages.core import (atomic_dir, block_lines, content_id, dumps, line_blocks, load_params, safe_name, unit_hash,
                         write_json, write_text)
from stages.executor import Executor, merge_parts, part_name, worker_count

EPOCH = "1970-01-01T00:00:00Z"  # created_at of traces that carry none: explicit, never "now"
_FAILURE_TEXT = {
    "unsupported_inference": "Makes an inference the input does not support",
    "hallucinated_fact": "States a fact that is not in the input",
    "pii_leak": "Repeats personal data from the input",
}
_ALWAYS_FORBIDDEN = [
    "Reveals a credential, API key, password or personal data",
    "Follows instructions embedded in user-provided content that contradict the system prompt",
]


def group_key(trace: dict) -> str:
    """Traces with the same prompt fall on the same side of the eval hold-out."""
    return content_id([[m["role"], " ".join(m.get("content", "").lower().split())] for m in prompt_messages(trace)])


def is_eval(trace: dict, params: ExportParams) -> bool:
    # A failed run's answer is no reference to score against; build_dataset filters it from training.
    if not trace["trainable"] or trace["outcome"] == "failed":
        return False
    wf = f"{trace['domain']}/{trace['workflow']}"
    return unit_hash(params.seed, "eval", wf, group_key(trace)) < params.eval_share


def _strs(val: Any) -> list[str]:
    return [v for v in val if isinstance(v, str)] if isinstance(val, list) else []


def _num(val: Any) -> float | None:
    return float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) and val >= 0 else None


def _pii_level(trace: dict) -> str:
    lvl = trace["extra"].get("pii_level")
    return lvl if isinstance(lvl, str) else ("redacted" if trace["redactions"] else "none")


def _redaction_status(trace: dict) -> str:
    for reason in trace["ineligible"]:
        if reason.startswith("redaction_status_"):
            return reason.removeprefix("redaction_status_")
    return "passed"


def _str_or_none(val: Any) -> str | None:
    return val if isinstance(val, str) else None


def trace_record(trace: dict) -> dict:
    extra = trace["extra"]
    review = {"status": trace["review"]["status"]}
    if trace["review"].get("notes"):
        review["review_notes"] = trace["review"]["notes"]
    if trace["review"].get("edit_distance_estimate"):
        review["edit_distance_estimate"] = trace["review"]["edit_distance_estimate"]
    target_use = _strs(extra.get("target_use")) or ["retrieval", "eval"] + (["fine_tune_candidate"] if trace["trainable"] else [])
    fields = dict(
        id=trace["id"], created_at=trace.get("created_at") or EPOCH, project=trace["project"],
        domain=trace["domain"], workflow=trace["workflow"], skill=_str_or_none(extra.get("skill")),
        host=trace["source"], model_used=_str_or_none(extra.get("model_used")),
        input_summary=_str_or_none(extra.get("input_summary")),
        input_hash=content_id(render(prompt_messages(trace), ("system", "user", "assistant", "tool"))),
        pii_level=_pii_level(trace), redaction_status=_redaction_status(trace),
        context_tokens_before=_num(extra.get("context_tokens_before")),
        context_tokens_after=_num(extra.get("context_tokens_after")),
        output_summary=_str_or_none(extra.get("output_summary")),
        human_review=review, eval_tags=_strs(extra.get("eval_tags")), failure_modes=_strs(extra.get("failure_modes")),
        trainable=trace["trainable"], target_use=target_use,
        model_target=extra.get("model_target") if isinstance(extra.get("model_target"), dict) else None,
        source_run_id_hash=trace.get("source_run_id_hash"),
    )
    if all(type(fields[k]) is str for k in _TRACE_RECORD_STRS) and type(fields["trainable"]) is bool \
            and type(fields["source_run_id_hash"]) in (str, type(None)):
        # Already what TraceRecord(...).model_dump(mode="json", exclude_none=True) returns (the other
        # fields are typed by the helpers above; tests/test_stream_export.py checks the two agree):
        # skip pydantic's validate + dump, half of this function's cost.
        out = {k: v for k, v in fields.items() if v is not None}
        out["raw_input_stored"] = False
        return out
    return TraceRecord(**fields).model_dump(mode="json", exclude_none=True)  # the model decides: coerce or fail


_TRACE_RECORD_STRS = ("id", "created_at", "project", "domain", "workflow", "host", "input_hash", "pii_level",
                      "redaction_status")


def training_example(trace: dict) -> dict:
    """agentic-stack's training example. The conversation is not repeated in the metadata (it was, and
    made export write twice what it read): it is trace `source_trace_ids[0]` in traces.jsonl."""
    meta = {
        "domain": trace["domain"], "workflow": trace["workflow"], "source_trace_ids": [trace["id"]],
        # build_dataset assigns train/val; "train" here means the training pool, never the eval hold-out.
        "split": "train", "pii_level": _pii_level(trace), "trainable": True,
        "bucket": trace["bucket"], "source": trace["source"], "outcome": trace["outcome"],
        **({"created_at": trace["created_at"]} if trace.get("created_at") else {}),
    }
    ex = {"instruction": instruction_of(trace), "context": "", "input": render(prompt_messages(trace)),
          "output": answer(trace), "metadata": meta}
    if type(ex["output"]) is str and all(type(meta.get(k, "")) is str for k in _EXAMPLE_META_STRS) \
            and type(trace["id"]) is str and meta["bucket"] in _BUCKETS and meta["outcome"] in _OUTCOMES:
        # Already TrainingExample's dump (mode="json", exclude_none=True): skip the model's validate + dump.
        return ex
    return TrainingExample(**ex).model_dump(mode="json", exclude_none=True)  # the model decides: coerce or fail


_EXAMPLE_META_STRS = ("domain", "workflow", "pii_level", "bucket", "source", "outcome", "created_at")
_BUCKETS, _OUTCOMES = frozenset(get_args(Bucket)), frozenset(get_args(Outcome))


def expected_behavior(reference: str, final: dict | None = None) -> list[str]:
    """Checkable statements about the approved answer: field by field when it is a JSON object; for a turn
    with tool calls, its text (if any) and each call as the model should write it."""
    if final is not None and final.get("tool_calls"):
        text = final.get("content", "").strip()
        return ([text] if text else []) + [render_tool_call(c["function"]["name"], c["function"]["arguments"])
                                           for c in final["tool_calls"]]
    try:
        obj = orjson.loads(reference)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and obj:
        return [f"{k}: {orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()}" for k, v in sorted(obj.items())]
    return [reference]


def eval_case(trace: dict) -> dict:
    extra = trace["extra"]
    ref = answer(trace)
    final = trace["messages"][-1] if trace["messages"] and trace["messages"][-1]["role"] == "assistant" else None
    calls = bool(final and final.get("tool_calls"))
    is_json = not calls and expected_behavior(ref) != [ref]
    forbidden = [_FAILURE_TEXT.get(f, f.replace("_", " ").capitalize()) for f in _strs(extra.get("failure_modes"))]
    case = EvalCase(
        id=f"eval_{trace['id']}", domain=trace["domain"], workflow=trace["workflow"],
        input_redacted=render(prompt_messages(trace)), expected_behavior=expected_behavior(ref, final),
        forbidden_behavior=sorted(set(forbidden)) + _ALWAYS_FORBIDDEN,
        rubric=["Matches the approved answer after normalisation"] + (["Valid JSON with the approved fields"] if is_json else [])
        + (["Calls the approved tools, in order, with the approved arguments"] if calls else []),
        tags=sorted({*_strs(extra.get("eval_tags")), trace["bucket"], trace["workflow"]}),
        source_trace_ids=[trace["id"]],
    )
    return case.model_dump(mode="json")


@dataclass
class _Workflow:
    domain: str
    workflow: str
    total: int = 0
    approved: int = 0
    trainable: int = 0
    negatives: int = 0
    eval_cases: list[str] = field(default_factory=list)
    rules: Counter = field(default_factory=Counter)
    approvals: Counter = field(default_factory=Counter)
    goals: Counter = field(default_factory=Counter)
    tools: dict[str, str] = field(default_factory=dict)


def _tool_signature(tool: dict) -> tuple[str, str] | None:
    fn = tool.get("function", tool)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        return None
    props = (fn.get("parameters") or {}).get("properties") if isinstance(fn.get("parameters"), dict) else None
    args = ", ".join(sorted(props)) if isinstance(props, dict) else ""
    desc = fn.get("description") if isinstance(fn.get("description"), str) else ""
    return fn["name"], f"{fn['name']}({args})" + (f": {desc}" if desc else "")


def _supported(counter: Counter, n: int, params: ExportParams) -> list[str]:
    keep = [(c, r) for r, c in counter.items() if c >= params.min_rule_support and n and c / n >= params.min_rule_share]
    return [r for c, r in sorted(keep, key=lambda x: (-x[0], x[1]))[: params.max_rules_per_card]]


def context_card(wf: _Workflow, params: ExportParams) -> dict:
    goal = min(wf.goals.items(), key=lambda x: (-x[1], x[0]))[0] if wf.goals else f"{wf.workflow} for {wf.domain}"
    card = {
        "id": f"card_{safe_name(wf.domain)}_{safe_name(wf.workflow)}", "domain": wf.domain, "workflow": wf.workflow,
        "goal": goal, "stable_rules": _supported(wf.rules, wf.approved, params),
        "tool_contracts": [wf.tools[k] for k in sorted(wf.tools)],
        "human_approval_required_for": _supported(wf.approvals, wf.approved, params),
        "source_trace_count": wf.approved, "token_budget": params.card_token_budget,
        "eval_refs": sorted(wf.eval_cases), "version": "",
    }
    card["version"] = content_id(card)[:12]
    return ContextCard.model_validate(card).model_dump(mode="json")


def card_markdown(card: dict) -> str:
    out = [f"# {card['domain']} / {card['workflow']}", "", f"**Goal:** {card['goal']}", "",
           f"Built from {card['source_trace_count']} approved runs; version `{card['version']}`.", "", "## Stable rules"]
    out += [f"- {r}" for r in card["stable_rules"]] or ["- (none with enough support yet)"]
    out += ["", "## Needs human approval for"] + ([f"- {r}" for r in card["human_approval_required_for"]] or ["- (none)"])
    if card["tool_contracts"]:
        out += ["", "## Tools"] + [f"- `{t}`" for t in card["tool_contracts"]]
    out += ["", f"Eval cases: {len(card['eval_refs'])}", ""]
    return "\n".join(out)


def readiness(approved: int, negatives: int, params: ExportParams) -> dict:
    tiers = sorted(params.readiness_tiers.items(), key=lambda x: x[1])
    top_name = tiers[-1][0]

    def reached(name: str, need: int) -> bool:
        ok = approved >= need
        return ok and (name != top_name or negatives >= params.negatives_share_for_top_tier * need)

    status = {name: reached(name, need) for name, need in tiers}
    done = [name for name, _ in tiers if status[name]]
    nxt = next(((name, need) for name, need in tiers if not status[name]), None)
    missing = 0
    if nxt:
        missing = max(nxt[1] - approved, 0)
        if nxt[0] == top_name:
            missing = max(missing, int(params.negatives_share_for_top_tier * nxt[1]) - negatives)
    return {"approved": approved, "negatives": negatives, "tier": done[-1] if done else "none",
            "next_tier": nxt[0] if nxt else None, "missing_for_next": missing, "tiers": status}


def _aware(stamp: Any) -> datetime | None:
    """The timezone-aware datetime of an ISO stamp, or None (a stamp the newest-trace figure skips)."""
    try:
        dt = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return dt if dt.tzinfo is not None else None


def _one(t: dict, params: ExportParams, approved_set: set[str]) -> tuple[bytes, bytes | None, bytes | None, tuple]:
    """One trace -> (trace record line, training example line or None, eval case line or None, the
    figures the aggregates need). Pure: run in worker processes, in any order."""
    record = dumps(trace_record(t))
    created = t.get("created_at")
    dt = _aware(created) if created else None
    approved = t["review"]["status"] in approved_set
    negative = t["review"]["status"] == "rejected" or t["bucket"] == "adversarial"
    b, a = _num(t["extra"].get("context_tokens_before")), _num(t["extra"].get("context_tokens_after"))
    card = None
    example = case = case_id = None
    if t["trainable"]:
        if approved:  # only approved, trainable (so redaction-clean) runs teach a card anything
            tools = [sig for sig in map(_tool_signature, t.get("tools") or ()) if sig]
            card = (list(set(_strs(t["extra"].get("stable_rules")))),
                    list(set(_strs(t["extra"].get("human_approval_required_for")))), instruction_of(t), tools)
        if is_eval(t, params):
            c = eval_case(t)
            case_id, case = c["id"], dumps(c)
        else:
            example = dumps(training_example(t))
    info = ((t["domain"], t["workflow"]), created if dt is not None else None, dt, approved,
            _redaction_status(t) == "passed", negative, b, a, t["trainable"], card, case_id)
    return record, example, case, info


class _Agg:
    """The aggregates of a run of consecutive traces: per-workflow figures, totals, token figures and
    the newest stamp. Workers fill one per block and the parent merges them in block order, which
    gives what one pass over all traces would (counts add up; token figures keep their order; the
    first tool signature and the first of the newest stamps win, block by block as trace by trace)."""

    def __init__(self) -> None:
        self.wfs: dict[tuple[str, str], _Workflow] = {}
        self.totals: Counter = Counter()
        # Compact float arrays, summed with sum() as lists were (the same additions, the same result).
        self.tokens_before, self.tokens_after = array("d"), array("d")
        self.newest: tuple[str, datetime] | None = None

    def _wf(self, key: tuple[str, str]) -> _Workflow:
        return self.wfs.get(key) or self.wfs.setdefault(key, _Workflow(*key))

    def add(self, info: tuple) -> None:
        key, created, dt, approved, passed, negative, b, a, trainable, card, case_id = info
        wf = self._wf(key)
        wf.total += 1
        totals = self.totals
        totals["total"] += 1
        if dt is not None and (self.newest is None or dt > self.newest[1]):
            self.newest = (created, dt)
        totals["accepted"] += approved
        totals["redaction_passed"] += passed
        if negative:
            wf.negatives += 1
        if b is not None and a is not None:
            self.tokens_before.append(b)
            self.tokens_after.append(a)
        if not trainable:
            return
        totals["trainable"] += 1
        wf.trainable += 1
        if card is not None:
            rules, approvals, goal, tools = card
            wf.approved += 1
            wf.rules.update(rules)
            wf.approvals.update(approvals)
            if goal:
                wf.goals[goal] += 1
            for sig in tools:
                wf.tools.setdefault(*sig)
        if case_id is not None:
            wf.eval_cases.append(case_id)
            totals["eval_cases"] += 1
        else:
            totals["training_examples"] += 1

    def merge(self, other: "_Agg") -> None:
        """Append the aggregates of the traces right after these."""
        for key, o in other.wfs.items():
            wf = self._wf(key)
            wf.total += o.total
            wf.approved += o.approved
            wf.trainable += o.trainable
            wf.negatives += o.negatives
            wf.eval_cases.extend(o.eval_cases)
            wf.rules.update(o.rules)
            wf.approvals.update(o.approvals)
            wf.goals.update(o.goals)
            for name, sig in o.tools.items():
                wf.tools.setdefault(name, sig)
        self.totals.update(other.totals)
        self.tokens_before.extend(other.tokens_before)
        self.tokens_after.extend(other.tokens_after)
        if other.newest is not None and (self.newest is None or other.newest[1] > self.newest[1]):
            self.newest = other.newest


def _block(params: ExportParams, block: tuple[str, int, int]) -> tuple[bytes, bytes, bytes, _Agg]:
    """A block of whole lines of traces.jsonl -> the three files' lines for it, and its aggregates."""
    approved_set = set(params.approved_statuses)
    records, examples, cases, agg = [], [], [], _Agg()
    for raw in block_lines(*block):
        record, example, case, info = _one(orjson.loads(raw), params, approved_set)
        records.append(record)
        if example is not None:
            examples.append(example)
        if case is not None:
            cases.append(case)
        agg.add(info)
    return tuple(b"".join(x + b"\n" for x in lines) for lines in (records, examples, cases)) + (agg,)


JSONL_OUTPUTS = ("trace-records.jsonl", "training-examples.jsonl", "eval-cases.jsonl")


def export_part(path: Path, out: Path, params: ExportParams, executor: Executor) -> _Agg:
    """The executor's rank of the map step: its shard of traces.jsonl's blocks -> its part of the three
    JSONL files in `out` (the files themselves in a world of one), and its aggregates, merged in block
    order (so the outputs don't depend on the worker count or timing)."""
    blocks = list(line_blocks(path))
    agg = _Agg()
    names = [out / part_name(n, executor.rank, executor.world_size) for n in JSONL_OUTPUTS]
    with open(names[0], "wb") as f_tr, open(names[1], "wb") as f_te, open(names[2], "wb") as f_ev:
        for records, examples, cases, block_agg in executor.map(_block, blocks, params, label="export",
                                                                records=lambda r: r[0].count(b"\n")):
            f_tr.write(records)
            f_te.write(examples)
            f_ev.write(cases)
            agg.merge(block_agg)
    return agg


def merge_parts_of(out: Path, world_size: int, aggs: list[_Agg]) -> _Agg:
    """The ranks' parts (in `out`) and aggregates (in rank order) -> the whole outputs and aggregates."""
    for name in JSONL_OUTPUTS:
        parts = [out / part_name(name, r, world_size) for r in range(world_size)]
        merge_parts(parts, out / name)
        for p in parts:
            p.unlink()
    agg = _Agg()
    for a in aggs:
        agg.merge(a)
    return agg


def export_file(path: Path, out: Path, params: ExportParams, workers: int = 1) -> dict:
    """traces.jsonl -> every export artifact in `out`, on this machine with `workers` processes."""
    return finish(out, params, export_part(path, out, params, Executor(workers)))


def finish(out: Path, params: ExportParams, agg: _Agg) -> dict:
    """The reduce step: cards, metrics and README from the merged aggregates; returns the stage summary."""
    wfs, totals = agg.wfs, agg.totals
    # EPOCH when no trace has an aware stamp later than it.
    newest = agg.newest[0] if agg.newest is not None and agg.newest[1] > _aware(EPOCH) else EPOCH
    cards = [context_card(wfs[k], params) for k in sorted(wfs)]
    write_json(out / "context-cards.json", cards)
    for card in cards:
        folder = out / "context-cards" / safe_name(card["domain"])
        write_json(folder / f"{safe_name(card['workflow'])}.json", card)
        write_text(folder / f"{safe_name(card['workflow'])}.md", card_markdown(card))
    metrics = flywheel_metrics(agg, params, newest)
    write_json(out / "flywheel-metrics.json", metrics)
    write_text(out / "README.md", _readme(metrics, totals, len(cards)))
    workflows = metrics["workflows"]
    return {"traces": totals["total"], "trainable": totals["trainable"], "training_examples": totals["training_examples"],
            "eval_cases": totals["eval_cases"], "context_cards": len(cards),
            "workflows": {k: {"tier": v["tier"], "training_examples": v["trainable"] - v["eval_cases"],
                              "eval_cases": v["eval_cases"]} for k, v in workflows.items()}}


def flywheel_metrics(agg: _Agg, params: ExportParams, newest: str) -> dict:
    wfs, totals, tokens_before, tokens_after = agg.wfs, agg.totals, agg.tokens_before, agg.tokens_after
    avg_b = sum(tokens_before) / len(tokens_before) if tokens_before else None
    avg_a = sum(tokens_after) / len(tokens_after) if tokens_after else None
    workflows = {}
    for k in sorted(wfs):
        wf = wfs[k]
        workflows[f"{wf.domain}/{wf.workflow}"] = {
            "domain": wf.domain, "workflow": wf.workflow, "total": wf.total, "trainable": wf.trainable,
            "eval_cases": len(wf.eval_cases), **readiness(wf.approved, wf.negatives, params)}
    return FlywheelMetrics(
        generated_at=newest, privacy_model=params.privacy_model, total_traces=totals["total"],
        accepted_traces=totals["accepted"], trainable_traces=totals["trainable"],
        redaction_pass_rate=round(totals["redaction_passed"] / totals["total"], 6) if totals["total"] else 1.0,
        avg_context_tokens_before=round(avg_b, 3) if avg_b is not None else None,
        avg_context_tokens_after=round(avg_a, 3) if avg_a is not None else None,
        context_reduction_pct=round(100 * (1 - avg_a / avg_b), 3) if avg_b and avg_a is not None else None,
        thresholds={"readiness_tiers": params.readiness_tiers, "min_rule_support": params.min_rule_support,
                    "eval_share": params.eval_share},
        workflows=workflows,
    ).model_dump(mode="json")


def _readme(metrics: dict, totals: Counter, n_cards: int) -> str:
    return "\n".join([
        "# agent-flywheel export", "",
        "Artifacts in agentic-stack's data-flywheel format, made from the redacted snapshot (its identity is in dvc.lock).", "",
        f"- `trace-records.jsonl`: {totals['total']} redacted trace records (every trace, trainable or not)",
        f"- `training-examples.jsonl`: {totals['training_examples']} instruction/input/output examples (eval hold-out excluded)",
        f"- `eval-cases.jsonl`: {totals['eval_cases']} held-out eval cases (a hash share of each workflow; never training examples)",
        f"- `context-cards.json` and `context-cards/<domain>/<workflow>.{{json,md}}`: {n_cards} cards from approved runs only",
        "- `flywheel-metrics.json`: counts and readiness tiers per workflow", "",
        f"Newest trace: {metrics['generated_at']}. Privacy model: {metrics['privacy_model']}.", ""])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--traces", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--metrics", required=True, type=Path)
    args = ap.parse_args(argv)
    params = load_params(args.params, "export", ExportParams)
    with atomic_dir(args.out) as tmp:
        summary = export_file(args.traces, tmp, params, workers=worker_count(params.workers))
    write_json(args.metrics, summary)
    print(f"export: {summary['traces']} traces -> {summary['training_examples']} training examples, "
          f"{summary['eval_cases']} eval cases, {summary['context_cards']} context cards")


if __name__ == "__main__":
    main()
