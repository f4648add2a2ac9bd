"""build_dataset: export's training pool + eval cases -> train/val/eval splits and a manifest.

Quality filters, exact and near dedup, ratio mixing and a hash-stable split. Every redacted
trace ends in exactly one fate (ineligible, eval, filtered, deduplicated against a named
survivor, over quota, train or val); the stage fails if that accounting does not add up.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHashLSH

from schemas.params import BuildDatasetParams, RedactParams
from schemas.records import DatasetManifest, SplitRow
from stages.core import atomic_open, content_id, dumps, load_params, read_jsonl, unit_hash, write_json
from stages.detectors import Redactor
from stages.leaks import Canaries, scan_text, strings

_WORD = re.compile(r"\w+", re.UNICODE)


# ---------------------------------------------------------------- quality filters
def quality_reason(messages: list[dict], outcome: str, params: BuildDatasetParams) -> str | None:
    """Why a conversation can't train, or None. Order matters only for which reason is counted."""
    if not messages:
        return "empty_conversation"
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    body = messages[lead:]
    if not body or body[0]["role"] != "user" or body[-1]["role"] != "assistant" \
            or any(m["role"] == "system" for m in body):
        return "role_order"
    prev = None
    for m in body:
        if m["role"] == "tool" and not (prev and (prev["role"] == "tool" or prev.get("tool_calls"))):
            return "role_order"
        if m["role"] in ("user", "assistant") and not m.get("content", "").strip() and not m.get("tool_calls"):
            return "empty_turn"
        prev = m
    if len(body[-1].get("content", "").strip()) < params.min_answer_chars:
        return "empty_answer"
    n = sum(len(m.get("content", "")) for m in messages)
    if n < params.min_chars:
        return "too_short"
    if n > params.max_chars:
        return "too_long"
    if params.exclude_failed and outcome == "failed":
        return "failed_outcome"
    return None


# ---------------------------------------------------------------- dedup keys
def canonical(messages: list[dict]) -> list:
    """Case- and whitespace-insensitive form of a conversation: what 'the same example' means."""
    out = []
    for m in messages:
        calls = [[c["function"]["name"], c["function"]["arguments"]] for c in m.get("tool_calls") or ()]
        out.append([m["role"], " ".join(m.get("content", "").lower().split()), calls])
    return out


def row_id(messages: list[dict]) -> str:
    return content_id(canonical(messages))


def shingles(messages: list[dict], n: int) -> set[bytes]:
    words = _WORD.findall(" ".join(m.get("content", "") for m in messages if m["role"] != "system").lower())
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


_PRIME = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)


class NearDedup:
    """MinHash + LSH: sub-quadratic near-duplicate search; survivors are checked by estimated Jaccard.

    Signatures are computed here, vectorised over shingles x permutations with xxhash, because
    datasketch's MinHash() draws its permutations anew for every object (~1 ms a row); its LSH
    index is used as it is.
    """

    def __init__(self, params: BuildDatasetParams):
        self.threshold = params.near_dedup_threshold
        self.num_perm = params.near_dedup_num_perm
        self.n = params.near_dedup_shingle
        self.lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self.sigs: dict[str, np.ndarray] = {}
        rng = np.random.RandomState(1)
        self._a = rng.randint(1, int(_PRIME), self.num_perm, dtype=np.uint64)
        self._b = rng.randint(0, int(_PRIME), self.num_perm, dtype=np.uint64)

    def signature(self, messages: list[dict]) -> LeanMinHash:
        hv = np.fromiter((xxhash.xxh32_intdigest(s) for s in shingles(messages, self.n)), dtype=np.uint64)
        # Universal hashing (a*h + b) mod p, in uint64 with wrap-around, as datasketch does.
        perm = np.bitwise_and((np.outer(hv, self._a) + self._b) % _PRIME, _MAX32)
        return LeanMinHash(seed=1, hashvalues=perm.min(axis=0), scheme="legacy")

    def find(self, key: str, mh: LeanMinHash) -> str | None:
        """The surviving row this one nearly duplicates, or None (then it becomes a survivor)."""
        best = None
        for cand in self.lsh.query(mh):
            sim = float(np.mean(self.sigs[cand] == mh.hashvalues))
            if sim >= self.threshold and (best is None or cand < best):
                best = cand
        if best is None:
            self.lsh.insert(key, mh)
            self.sigs[key] = mh.hashvalues
        return best


# ---------------------------------------------------------------- the build
@dataclass
class Candidate:
    id: str
    trace_id: str
    bucket: str
    order: tuple[str, str]


def _meta(ex: dict) -> dict:
    return ex["metadata"]


def read_eval(cases: Iterable[dict]) -> dict[str, dict]:
    """trace id -> eval case."""
    return {tid: c for c in cases for tid in c["source_trace_ids"]}


def build(traces_path: Path, rejects_path: Path, export_dir: Path, out_dir: Path,
          params: BuildDatasetParams, redactor: Redactor, canaries: Canaries | None = None) -> dict[str, Any]:
    canaries = canaries or Canaries()
    eval_by_trace = read_eval(read_jsonl(export_dir / "eval-cases.jsonl"))
    fates: Counter = Counter()
    filtered: Counter = Counter()
    ineligible: Counter = Counter()
    excl: list[dict] = []  # the exclusion log: trace id, reason, survivor

    def drop(tid: str, reason: str, survivor: str | None = None, kind: str = "filtered") -> None:
        fates[kind] += 1
        if kind == "filtered":
            filtered[reason] += 1
        excl.append({"trace_id": tid, "reason": reason, **({"survivor": survivor} if survivor else {})})

    # Pass 1 over traces: the ones that can't train, and the eval rows (which take dedup priority).
    near = NearDedup(params)
    exact: dict[str, str] = {}
    eval_rows: list[dict] = []
    stats = Counter()
    files: dict[str, dict[str, Any]] = {}
    for t in read_jsonl(traces_path):
        stats["traces"] += 1
        f = files.setdefault(t["source_file"], {"bucket": t["bucket"], "traces": 0})
        f["traces"] += 1
        stats["rows_with_redactions"] += bool(t["redactions"])
        stats["redactions_applied"] += sum(t["redactions"].values())
        if not t["trainable"]:
            fates["ineligible"] += 1
            ineligible[t["ineligible"][0]] += 1
            excl.append({"trace_id": t["id"], "reason": f"ineligible:{','.join(t['ineligible'])}"})
            continue
        case = eval_by_trace.get(t["id"])
        if case is None:
            continue
        reason = quality_reason(t["messages"], t["outcome"], params)
        if reason:
            drop(t["id"], f"eval_{reason}")
            continue
        rid = row_id(t["messages"])
        if rid in exact:
            drop(t["id"], "eval_duplicate", exact[rid], kind="dedup_exact")
            continue
        exact[rid] = rid
        near.find(rid, near.signature(t["messages"]))  # registers eval rows as survivors
        fates["eval"] += 1
        eval_rows.append(SplitRow(
            id=rid, source=t["source"], bucket=t["bucket"], domain=t["domain"], workflow=t["workflow"],
            messages=t["messages"], tools=t.get("tools"), trace_id=t["id"], eval_case_id=case["id"],
            expected_behavior=case["expected_behavior"], forbidden_behavior=case["forbidden_behavior"],
        ).model_dump(mode="json", exclude_none=True))
    eval_ids = set(exact)

    # Pass 2 over the training pool: filters and exact dedup, keeping only small keys in memory.
    cands: list[Candidate] = []
    n_examples = 0
    for ex in read_jsonl(export_dir / "training-examples.jsonl"):
        n_examples += 1
        meta = _meta(ex)
        tid = meta["source_trace_ids"][0]
        reason = quality_reason(meta["messages"], meta.get("outcome", "unknown"), params)
        if reason:
            drop(tid, reason)
            continue
        rid = row_id(meta["messages"])
        if rid in exact:
            kind = "eval_overlap" if exact[rid] in eval_ids else "dedup_exact"
            drop(tid, kind, exact[rid], kind=kind)
            continue
        exact[rid] = rid
        cands.append(Candidate(rid, tid, meta["bucket"], (meta.get("created_at") or "", rid)))
    if n_examples + len(eval_by_trace) != stats["traces"] - fates["ineligible"]:
        raise RuntimeError(f"export and redact disagree: {n_examples} examples + {len(eval_by_trace)} eval cases "
                           f"!= {stats['traces'] - fates['ineligible']} trainable traces")

    # Near dedup in (created_at, id) order, so that an old survivor stays the survivor when new data arrives.
    cands.sort(key=lambda c: c.order)
    cand_ids = {c.id for c in cands}
    keep: dict[str, Candidate] = {}
    sigs = {}
    for ex in read_jsonl(export_dir / "training-examples.jsonl"):
        m = _meta(ex)["messages"]
        rid = row_id(m)
        if rid in cand_ids and rid not in sigs:
            sigs[rid] = near.signature(m)
    for c in cands:
        survivor = near.find(c.id, sigs.pop(c.id))
        if survivor is None:
            keep[c.id] = c
        else:
            kind = "eval_overlap" if survivor in eval_ids else "dedup_near"
            drop(c.trace_id, kind, survivor, kind=kind)
    sigs.clear()

    # Mixing: each bucket fills at most its quota, in hash order; a short bucket is reported, not refilled.
    by_bucket: dict[str, list[Candidate]] = {b: [] for b in params.ratios}
    for c in keep.values():
        by_bucket.setdefault(c.bucket, []).append(c)
    selected: dict[str, str] = {}  # row id -> split
    bucket_report = {}
    for b, rows in sorted(by_bucket.items()):
        quota = round(params.ratios.get(b, 0.0) * params.target_examples)
        rows.sort(key=lambda c: (unit_hash(params.seed, "mix", c.id), c.id))
        for c in rows[quota:]:
            drop(c.trace_id, "over_quota", kind="over_quota")
        chosen = rows[:quota]
        for c in chosen:
            split = "val" if unit_hash(params.seed, "split", c.id) < params.val_ratio else "train"
            selected[c.id] = split
            fates[split] += 1
        bucket_report[b] = {"available": len(rows), "quota": quota, "selected": len(chosen),
                            "shortfall": max(quota - len(chosen), 0)}

    # Pass 3: write the splits in a stable order (by row id), rescanning every string as we go.
    rescan = Counter()
    lengths = {"prompt_chars": [], "answer_chars": []}
    workflows, outcomes = Counter(), Counter()
    rows_out: dict[str, list[bytes]] = {"train": [], "val": []}
    for ex in read_jsonl(export_dir / "training-examples.jsonl"):
        meta = _meta(ex)
        rid = row_id(meta["messages"])
        split = selected.get(rid)
        if split is None or keep.get(rid) is None or keep[rid].trace_id != meta["source_trace_ids"][0]:
            continue
        row = SplitRow(id=rid, source=meta["source"], bucket=meta["bucket"], domain=meta["domain"],
                       workflow=meta["workflow"], messages=meta["messages"], tools=meta.get("tools"),
                       trace_id=meta["source_trace_ids"][0]).model_dump(mode="json", exclude_none=True)
        rescan.update(_rescan(row, redactor, canaries))
        lengths["prompt_chars"].append(len(ex["input"]) + len(ex["instruction"]))
        lengths["answer_chars"].append(len(ex["output"]))
        workflows[f"{meta['domain']}/{meta['workflow']}"] += 1
        outcomes[meta.get("outcome", "unknown")] += 1
        rows_out[split].append(dumps(row))
    for r in eval_rows:
        rescan.update(_rescan(r, redactor, canaries))
    digests = {}
    for name, rows in (("train", rows_out["train"]), ("val", rows_out["val"]),
                       ("eval", [dumps(r) for r in eval_rows])):
        rows.sort(key=lambda b: xxhash.xxh3_64_intdigest(b))  # stable order, independent of input order
        with atomic_open(out_dir / f"{name}.jsonl") as fh:
            for b in rows:
                fh.write(b + b"\n")
        digests[name] = xxhash.xxh3_128_hexdigest(b"\n".join(rows))
    excl.sort(key=lambda e: (e["reason"], e["trace_id"]))
    with atomic_open(out_dir / "rejects.jsonl") as fh:
        for e in excl:
            fh.write(dumps(e) + b"\n")

    redact_rejects = sum(1 for r in read_jsonl(rejects_path) if r["line"] > 0)
    raw_rows = stats["traces"] + redact_rejects
    acc = {"raw_records": raw_rows, "redact_rejected": redact_rejects, **{k: fates[k] for k in sorted(fates)}}
    acc["ok"] = raw_rows == redact_rejects + sum(fates.values())
    if not acc["ok"]:
        raise RuntimeError(f"accounting broken: {acc}")
    return {"accounting": acc, "fates": fates, "filtered": filtered, "ineligible": ineligible, "stats": stats,
            "buckets": bucket_report, "digests": digests, "rescan": rescan, "lengths": lengths,
            "workflows": workflows, "outcomes": outcomes, "n_eval": len(eval_rows),
            "files": dict(sorted(files.items()))}


def _rescan(row: dict, redactor: Redactor, canaries: Canaries) -> Counter:
    found: Counter = Counter()
    for s in strings(row):
        found.update(scan_text(s, redactor, canaries))
    return found


def _percentiles(xs: list[int]) -> dict[str, float]:
    if not xs:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def manifest(res: dict, params: BuildDatasetParams, input_digests: dict[str, str]) -> dict:
    f, st = res["fates"], res["stats"]
    source_files: dict[str, list[str]] = {}
    for name, info in res["files"].items():
        source_files.setdefault(info["bucket"], []).append(name)
    selected = f["train"] + f["val"]
    real_files = source_files.get("real", [])
    rescan_hits = sum(res["rescan"].values())
    m = DatasetManifest(
        contract_version=params.contract_version,
        inputs={"raw_trace_glob": "{approved-runs,traces}/*.jsonl", "raw_trace_files": real_files,
                "synthetic_file": ",".join(source_files.get("synthetic", [])),
                "adversarial_file": ",".join(source_files.get("adversarial", []))},
        build={"target_examples": params.target_examples, "selected_examples": selected,
               "train_examples": f["train"], "val_examples": f["val"], "eval_examples": res["n_eval"],
               "min_examples": params.min_examples, "min_example_ok": selected >= params.min_examples,
               "val_ratio": params.val_ratio, "ratios": dict(params.ratios),
               "min_redaction_rate": params.min_redaction_rate,
               "redaction_ok": rescan_hits == 0,
               "redaction_rate": round(st["rows_with_redactions"] / st["traces"], 6) if st["traces"] else 0.0},
        qc={"raw_rows": res["accounting"]["raw_records"], "rejected_malformed": res["accounting"]["redact_rejected"],
            "rejected_low_signal": sum(res["filtered"].values()), "rows_with_redactions": st["rows_with_redactions"],
            "redactions_applied": st["redactions_applied"],
            "post_dedup_rows": selected + f["over_quota"],
            "category_counts": dict(sorted(res["workflows"].items())), "outcome_counts": dict(sorted(res["outcomes"].items()))},
        seed=params.seed,
        digest=content_id(res["digests"]),
        input_digests=input_digests,
        buckets=res["buckets"],
        duplicates={"exact": f["dedup_exact"], "near": f["dedup_near"], "eval_overlap": f["eval_overlap"]},
        rejects_by_reason={**{f"ineligible:{k}": v for k, v in sorted(res["ineligible"].items())}},
        filtered_by_reason=dict(sorted(res["filtered"].items())),
        length_percentiles={k: _percentiles(v) for k, v in res["lengths"].items()},
        accounting=res["accounting"],
        rescan={"findings": rescan_hits, "by_detector": dict(sorted(res["rescan"].items()))},
        split_digests=res["digests"],
        traces_by_file={k: v["traces"] for k, v in res["files"].items()},
    )
    return m.model_dump(mode="json")


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--traces", required=True, type=Path)
    ap.add_argument("--rejects", required=True, type=Path)
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--manifest", required=True, type=Path)
    args = ap.parse_args(argv)
    params = load_params(args.params, "build_dataset", BuildDatasetParams)
    rp = load_params(args.params, "redact", RedactParams)
    redactor = Redactor(ip_public_only=rp.ip_public_only, entropy_threshold=rp.entropy_threshold,
                        entropy_min_len=rp.entropy_min_len, disabled=frozenset(rp.disabled_detectors))
    res = build(args.traces, args.rejects, args.export, args.out, params, redactor,
                Canaries(rp.canaries, rp.canary_sha256))
    inputs = {"traces": args.traces, "rejects": args.rejects,
              "training_examples": args.export / "training-examples.jsonl", "eval_cases": args.export / "eval-cases.jsonl"}
    man = manifest(res, params, {k: file_digest(p) for k, p in inputs.items()})
    write_json(args.manifest, man)
    b, acc = man["build"], man["accounting"]
    print(f"build_dataset: {acc['raw_records']} records -> train {b['train_examples']}, val {b['val_examples']}, "
          f"eval {b['eval_examples']}; dup exact {man['duplicates']['exact']}, near {man['duplicates']['near']}, "
          f"filtered {man['qc']['rejected_low_signal']}; redaction_ok={b['redaction_ok']}")


if __name__ == "__main__":
    main()
