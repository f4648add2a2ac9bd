"""build_dataset: redact's traces + export's eval cases -> train/val/eval splits, the exclusion log and a manifest.

Named passes, in order (build() below reads as this list):
1. eval registration: export's eval cases, by trace id (the cases stay on disk);
2. pool: one pass over traces.jsonl through the executor: the traces that can't train (ineligible,
   filtered), the eval rows (which take dedup priority) and compact columns of the training pool
   (export's training examples: every trainable trace that is not an eval case);
3. dedup: exact (the first in file order survives), then near (stages/dedup.py: eval rows first,
   then the pool in (created_at, id) order, so that an old survivor stays the survivor);
4. mix and split: each bucket fills at most its quota, in hash order; a hash-stable train/val split;
5. write: the selected traces again (only those are parsed), rescanned as they are written;
6. accounting: every redacted trace ends in exactly one fate (ineligible, eval, filtered,
   deduplicated against a named survivor, over quota, train or val); the stage fails if that does
   not add up. Every excluded trace has a line in excluded.jsonl (schemas.records.Exclusion).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import xxhash

from schemas.params import BuildDatasetParams, RedactParams
from schemas.records import DatasetManifest, EvalCase, Reject, SplitRow
from stages.chat import answer, instruction_of, prompt_messages, reference_text, render
from stages.core import (SpillSort, atomic_open, block_lines, content_id, dumps, iter_lines, line_blocks, load_params,
                         read_models, unit_hash, write_json)
from stages.dedup import NearDedup, Signatures, near_duplicates, row_id, shingle_hashes
from stages.executor import Executor, worker_count
from stages.scanning import Canaries, RowScanner, canaries_from, redactor_from
from stages.detectors import Redactor

EXCLUDED = "excluded.jsonl"
_OVER_QUOTA = "over_quota"


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
    # A final turn of tool calls is an answer: for an agent, the call is what it should do next.
    if len(reference_text(body[-1])) < params.min_answer_chars:
        return "empty_answer"
    n = sum(len(m.get("content", "")) for m in messages)
    if n < params.min_chars:
        return "too_short"
    if n > params.max_chars:
        return "too_long"
    if params.exclude_failed and outcome == "failed":
        return "failed_outcome"
    return None


# ---------------------------------------------------------------- 1. eval registration
def register_eval(path: Path) -> dict[str, int]:
    """trace id -> byte offset of its eval case's line: the cases themselves stay on disk."""
    out: dict[str, int] = {}
    with open(path, "rb") as fh:
        pos = 0
        for raw in fh:
            if raw.strip():
                for tid in orjson.loads(raw)["source_trace_ids"]:
                    out[tid] = pos
            pos += len(raw)
    return out


# ---------------------------------------------------------------- fates and the exclusion log
class _Fates:
    """Every trace's fate, counted, and the exclusion log ((reason, trace id) -> its line, sorted on write)."""

    def __init__(self, tmp: Path):
        self.fates: Counter = Counter()
        self.filtered: Counter = Counter()
        self.ineligible: Counter = Counter()
        self.log = SpillSort(tmp)

    def drop(self, tid: str, reason: str, survivor: str | None = None, kind: str = "filtered") -> None:
        self.fates[kind] += 1
        if kind == "filtered":
            self.filtered[reason] += 1
        self.log.add((reason, tid), dumps({"trace_id": tid, "reason": reason, **({"survivor": survivor} if survivor else {})}))

    def not_eligible(self, tid: str, reasons: list[str]) -> None:
        self.fates["ineligible"] += 1
        self.ineligible[reasons[0]] += 1
        reason = f"ineligible:{','.join(reasons)}"
        self.log.add((reason, tid), dumps({"trace_id": tid, "reason": reason}))


# ---------------------------------------------------------------- 2. pool
@dataclass
class _State:
    """What every block of work needs: built once here, inherited by the executor's forked workers."""

    params: BuildDatasetParams
    near: NearDedup
    scan_row: RowScanner
    eval_at: dict[str, int]
    eval_path: str

    def rescan(self, row: dict, line: bytes) -> Counter | None:
        """The rescan of an output row (its line is `dumps(row)`): None when nothing fires. Rows whose
        compact JSON the detectors' compiled prefilter clears (redact's fast path: sound, it proves that
        no detector can find anything in any string of the record) skip the scan, most of this stage's
        time otherwise; tests/test_stream_build.py checks the counts equal a full scan of every row."""
        scan = self.scan_row
        if not scan.canaries and scan.redactor.has_compiled_prefilter and scan.redactor.nothing_to_find(line):
            return None
        return scan(row) or None


class _Column:
    """An append-only column of fixed-width bytes, kept as numpy chunks (no per-row Python objects)."""

    def __init__(self):
        self._chunks: list[np.ndarray] = []
        self._buf: list[bytes] = []

    def append(self, value: bytes) -> None:
        self._buf.append(value)
        if len(self._buf) >= 65536:
            self._chunks.append(np.array(self._buf, dtype=bytes))
            self._buf = []

    def array(self) -> np.ndarray:
        if self._buf:
            self._chunks.append(np.array(self._buf, dtype=bytes))
            self._buf = []
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype="S1")



class _Pool:
    """The pool pass's result: the eval rows (lines and keys), the training pool's compact columns
    (row id, trace id, created_at, bucket, trace index), both sets of signatures, and the counts."""

    def __init__(self, near: NearDedup, tmp: Path):
        self.eval_rids: set[str] = set()
        self.eval_keys: list[str] = []
        self.eval_rows = SpillSort(tmp)
        self.eval_sigs, self.sigs = Signatures(near, tmp / "signatures.bin"), Signatures(near, tmp / "pool.bin")
        self.rid, self.tid, self.created = _Column(), _Column(), _Column()
        self.trace_index = array("q")  # the trace (index among traces.jsonl's lines) of each pool row
        self.bucket_names: dict[str, int] = {}
        self.bucket_code = bytearray()
        self.stats: Counter = Counter()
        self.files: dict[str, dict[str, Any]] = {}
        self.rescan: Counter = Counter()
        self.block_rows: list[int] = []  # traces per block, to hand the write pass its slice of split_of
        self.n_pool = self.n_eval = 0  # training examples and eval cases met (before any filter)

    def add_block(self, stats: Counter, files: dict[str, list]) -> int:
        """Count a block in; returns the index of its first trace."""
        first = sum(self.block_rows)
        self.block_rows.append(stats["traces"])
        self.stats.update(stats)
        for source_file, (bucket, n) in files.items():
            f = self.files.get(source_file) or self.files.setdefault(source_file, {"bucket": bucket, "traces": 0})
            f["traces"] += n
        return first

    def add_eval(self, r: tuple, fates: _Fates) -> bool:
        """An eval row, unless it repeats an earlier one (eval rows dedup among themselves in file order)."""
        tid, _, rid, row, found, _k = r
        if rid in self.eval_rids:
            fates.drop(tid, "eval_duplicate", rid, kind="dedup_exact")
            return False
        self.eval_rids.add(rid)
        self.eval_keys.append(rid)
        fates.fates["eval"] += 1
        if found:
            self.rescan.update(found)
        self.eval_rows.add(xxhash.xxh3_64_intdigest(row), row)
        return True

    def add_row(self, r: tuple, first: int) -> None:
        tid, _, rid, bucket, created, _k, i = r
        self.rid.append(rid.encode())
        self.tid.append(tid.encode())
        self.created.append(created.encode())
        self.bucket_code.append(self.bucket_names.setdefault(bucket, len(self.bucket_names)))
        self.trace_index.append(first + i)

    def close_signatures(self) -> tuple[Path, np.ndarray]:
        """One signature file, eval rows first (slots 0..E-1) and then the pool rows, and its band hashes."""
        eval_bands, pool_bands = self.eval_sigs.close(), self.sigs.close()
        with open(self.eval_sigs.path, "ab") as out, open(self.sigs.path, "rb") as fh:
            shutil.copyfileobj(fh, out, 1 << 20)
        self.sigs.path.unlink()
        return self.eval_sigs.path, np.concatenate([eval_bands, pool_bands])


def _traces_block(state: _State, block: tuple[str, int, int]) -> tuple[list[tuple], np.ndarray, Counter, dict[str, list]]:
    """The pool pass on a block of traces: for each trace that is not simply counted, (trace id, kind, ...)
    where kind is "ineligible" (+ reasons), "filtered" (+ reason), "eval" (+ row id, the row's line, its
    rescan, its signature's index) or "pool" (+ row id, bucket, created_at, its signature's index, its
    index in the block); the signatures; the block's trace and redaction counts; and its source files
    (-> [bucket of the first trace, traces])."""
    params, near, eval_at = state.params, state.near, state.eval_at
    out: list[tuple] = []
    hashes: list[np.ndarray] = []
    stats: Counter = Counter()
    files: dict[str, list] = {}
    with open(state.eval_path, "rb") as eval_fh:
        for i, raw in enumerate(block_lines(*block)):
            t = orjson.loads(raw)
            stats["traces"] += 1
            f = files.get(t["source_file"]) or files.setdefault(t["source_file"], [t["bucket"], 0])
            f[1] += 1
            stats["rows_with_redactions"] += bool(t["redactions"])
            stats["redactions_applied"] += sum(t["redactions"].values())
            tid = t["id"]
            if not t["trainable"]:
                out.append((tid, "ineligible", t["ineligible"]))
                continue
            pos = eval_at.get(tid)
            stats["eval_cases" if pos is not None else "training_examples"] += 1
            reason = quality_reason(t["messages"], t["outcome"], params)
            if reason:
                out.append((tid, "filtered", reason if pos is None else f"eval_{reason}"))
                continue
            rid = row_id(t["messages"])
            if pos is None:
                out.append((tid, "pool", rid, t["bucket"], t.get("created_at") or "", len(hashes), i))
            else:
                row = _eval_row(t, rid, eval_fh, pos)
                line = dumps(row)
                # (the rescan is nearly always empty: None then, cheaper to send back than a Counter)
                out.append((tid, "eval", rid, line, state.rescan(row, line), len(hashes)))
            hashes.append(shingle_hashes(t["messages"], near.n))
    return out, near.signatures(hashes), stats, files


def _eval_row(t: dict, rid: str, eval_fh: Any, pos: int) -> dict:
    eval_fh.seek(pos)
    case = EvalCase.model_validate_json(eval_fh.readline())
    return SplitRow(
        id=rid, source=t["source"], bucket=t["bucket"], domain=t["domain"], workflow=t["workflow"],
        messages=t["messages"], tools=t.get("tools"), trace_id=t["id"], eval_case_id=case.id,
        expected_behavior=case.expected_behavior, forbidden_behavior=case.forbidden_behavior,
    ).model_dump(mode="json", exclude_none=True)


def pool_pass(executor: Executor, state: _State, blocks: list[tuple], fates: _Fates, tmp: Path) -> _Pool:
    """Pass 2: every trace once. Rows are parsed, filtered, keyed, signed and rescanned by the executor
    a block at a time; every order-dependent decision (eval dedup, signature slots, fates) is made
    here, in block order, so the outputs don't depend on the worker count or timing."""
    pool = _Pool(state.near, tmp)
    for out, sig, stats, files in executor.map(_traces_block, blocks, state, label="build_dataset traces",
                                               records=lambda r: r[2]["traces"]):
        first = pool.add_block(stats, files)
        eval_taken, pool_taken = [], []
        for r in out:
            tid, kind = r[0], r[1]
            if kind == "ineligible":
                fates.not_eligible(tid, r[2])
            elif kind == "filtered":
                fates.drop(tid, r[2])
            elif kind == "eval":
                if pool.add_eval(r, fates):
                    eval_taken.append(r[5])
            else:
                pool.add_row(r, first)
                pool_taken.append(r[5])
        pool.eval_sigs.add(sig[eval_taken])
        pool.sigs.add(sig[pool_taken])
    return pool


def check_export(pool: _Pool, export_dir: Path, eval_at: dict[str, int]) -> None:
    """export's files and redact's traces must describe the same split of the trainable traces."""
    n_examples = sum(1 for _ in iter_lines(export_dir / "training-examples.jsonl"))
    st = pool.stats
    if n_examples != st["training_examples"] or len(eval_at) != st["eval_cases"]:
        raise RuntimeError(f"export and redact disagree: {n_examples} examples + {len(eval_at)} eval cases != "
                           f"{st['training_examples']} + {st['eval_cases']} trainable traces")


# ---------------------------------------------------------------- 3. dedup
def dedup_pass(pool: _Pool, near: NearDedup, fates: _Fates) -> np.ndarray:
    """Which pool rows survive dedup (a mask over the columns); every other row is logged with its survivor."""
    rids, tids, created = pool.rid.array(), pool.tid.array(), pool.created.array()
    n_eval = len(pool.eval_keys)
    eval_keys = np.array(pool.eval_keys, dtype="S32")
    # A pool row equal to an eval row overlaps it: the eval case wins.
    overlap = np.isin(rids, eval_keys) if n_eval and len(rids) else np.zeros(len(rids), dtype=bool)
    for k in np.flatnonzero(overlap).tolist():
        fates.drop(tids[k].decode(), "eval_overlap", rids[k].decode(), kind="eval_overlap")
    # Exact duplicates in the pool: the first occurrence in file order survives.
    rest = np.flatnonzero(~overlap)
    first = np.zeros(len(rids), dtype=bool)
    if len(rest):
        first[rest[np.unique(rids[rest], return_index=True)[1]]] = True
    for k in np.flatnonzero(~first & ~overlap).tolist():
        fates.drop(tids[k].decode(), "dedup_exact", rids[k].decode(), kind="dedup_exact")
    # Near dedup: eval rows first (file order), then candidates in (created_at, id) order, so that an
    # old survivor stays the survivor when new data arrives (a trace without a stamp counts as oldest).
    # Slots: eval rows, then pool rows.
    cand = np.flatnonzero(first)
    cand = cand[np.lexsort((rids[cand], created[cand]))]
    keys = np.concatenate([eval_keys, rids]) if n_eval else rids
    sig_path, band_hash = pool.close_signatures()
    survivor_of = near_duplicates(near, sig_path, band_hash, np.concatenate([np.arange(n_eval), n_eval + cand]), keys)
    sig_path.unlink()
    pool_survivor = survivor_of[n_eval:]
    keep = np.zeros(len(rids), dtype=bool)
    keep[cand] = True
    for k in np.flatnonzero(keep & (pool_survivor >= 0)).tolist():
        s = int(pool_survivor[k])
        kind = "eval_overlap" if s < n_eval else "dedup_near"
        fates.drop(tids[k].decode(), kind, keys[s].decode(), kind=kind)
        keep[k] = False
    return keep


# ---------------------------------------------------------------- 4. mix and split
def mix_and_split(pool: _Pool, keep: np.ndarray, params: BuildDatasetParams,
                  fates: _Fates) -> tuple[np.ndarray, dict[int, str], dict[str, dict[str, int]], np.ndarray]:
    """(split code by trace index: 0 not selected, 1 train, 2 val; the row id of each selected trace, by
    trace index; the bucket report; the over-quota trace ids, sorted). Each bucket fills at most its
    quota, in hash order; a short bucket is reported, not refilled."""
    rids, tids = pool.rid.array(), pool.tid.array()
    buckets = np.frombuffer(bytes(pool.bucket_code), dtype=np.uint8)
    trace_index = np.frombuffer(pool.trace_index, dtype=np.int64)
    split_of = np.zeros(sum(pool.block_rows), dtype=np.uint8)
    report, over_quota, chosen_rid = {}, [], {}
    # The configured buckets, and any other bucket that still has a row.
    names = sorted(set(params.ratios) | {b for b, c in pool.bucket_names.items() if (keep & (buckets == c)).any()})
    for b in names:
        code = pool.bucket_names.get(b)
        rows = np.flatnonzero(keep & (buckets == code)) if code is not None else np.zeros(0, dtype=np.int64)
        quota = round(params.ratios.get(b, 0.0) * params.target_examples)
        mix = np.fromiter((unit_hash(params.seed, "mix", rids[k].decode()) for k in rows.tolist()), dtype=np.float64,
                          count=len(rows))
        rows = rows[np.lexsort((rids[rows], mix))]
        if len(rows) > quota:  # (fates gets an over_quota key only when a bucket is over its quota)
            fates.fates[_OVER_QUOTA] += len(rows) - quota
            over_quota.append(tids[rows[quota:]])
        chosen = rows[:quota]
        for k in chosen.tolist():
            split = "val" if unit_hash(params.seed, "split", rids[k].decode()) < params.val_ratio else "train"
            split_of[trace_index[k]] = 2 if split == "val" else 1
            chosen_rid[int(trace_index[k])] = rids[k].decode()
            fates.fates[split] += 1
        report[b] = {"available": len(rows), "quota": quota, "selected": len(chosen),
                     "shortfall": max(quota - len(chosen), 0)}
    # Over-quota rows are most rows of a big snapshot, all with one reason: their log lines are made
    # at the end from their trace ids, sorted here, instead of going through the exclusion log's runs.
    over_tids = np.sort(np.concatenate(over_quota)) if over_quota else np.zeros(0, dtype="S1")
    return split_of, chosen_rid, report, over_tids


# ---------------------------------------------------------------- 5. write
def _selected_block(state: _State, task: tuple[str, int, int, bytes, list[str]]) -> list[tuple]:
    """The write pass on a block of traces, their split codes (0 not selected, 1 train, 2 val) and the
    selected ones' row ids (from the pool pass: not computed twice): per selected trace (code, its row's
    line, rescan, prompt chars, answer chars, workflow, outcome). The character counts are those of
    export's training example (instruction + input, output)."""
    *block, codes, rids = task
    out = []
    selected = iter(rids)
    for code, raw in zip(codes, block_lines(*block)):
        if not code:
            continue
        t = orjson.loads(raw)
        row = SplitRow(
            id=next(selected), source=t["source"], bucket=t["bucket"], domain=t["domain"],
            workflow=t["workflow"], messages=t["messages"], tools=t.get("tools") or None,
            trace_id=t["id"]).model_dump(mode="json", exclude_none=True)
        line = dumps(row)
        out.append((code, line, state.rescan(row, line),
                    len(render(prompt_messages(t))) + len(instruction_of(t)), len(answer(t)),
                    f"{t['domain']}/{t['workflow']}", t["outcome"]))
    return out


def write_pass(executor: Executor, state: _State, blocks: list[tuple], pool: _Pool, split_of: np.ndarray,
               chosen_rid: dict[int, str], tmp: Path) -> dict[str, Any]:
    """The selected traces (only those lines are parsed), rescanned; rows sorted into their splits."""
    res: dict[str, Any] = {"lengths": {"prompt_chars": [], "answer_chars": []}, "workflows": Counter(),
                           "outcomes": Counter(), "rows": {"train": SpillSort(tmp), "val": SpillSort(tmp)}}
    tasks, j0 = [], 0
    for block, n in zip(blocks, pool.block_rows):
        codes = split_of[j0:j0 + n]
        if codes.any():
            tasks.append((*block, codes.tobytes(), [chosen_rid[j0 + int(i)] for i in np.flatnonzero(codes)]))
        j0 += n
    for out in executor.map(_selected_block, tasks, state, label="build_dataset write", records=len):
        for code, row, found, prompt_chars, answer_chars, workflow, outcome in out:
            if found:
                pool.rescan.update(found)
            res["lengths"]["prompt_chars"].append(prompt_chars)
            res["lengths"]["answer_chars"].append(answer_chars)
            res["workflows"][workflow] += 1
            res["outcomes"][outcome] += 1
            res["rows"]["train" if code == 1 else "val"].add(xxhash.xxh3_64_intdigest(row), row)
    return res


def write_splits(out_dir: Path, splits: dict[str, SpillSort]) -> dict[str, str]:
    """Each split in a stable order (by the row's xxh3_64, ties in input order); its digest as it goes."""
    digests = {}
    for name, rows in splits.items():
        h = xxhash.xxh3_128()
        with atomic_open(out_dir / f"{name}.jsonl") as fh:
            for i, (_, b) in enumerate(rows):
                if i:
                    h.update(b"\n")
                h.update(b)
                fh.write(b + b"\n")
        digests[name] = h.hexdigest()
    return digests


def write_exclusions(path: Path, log: SpillSort, over_tids: np.ndarray) -> None:
    """The exclusion log in (reason, trace id) order; the over-quota lines go in at their place."""
    with atomic_open(path) as fh:
        pending = len(over_tids) > 0
        for (reason, _), line in log:
            if pending and reason > _OVER_QUOTA:
                _write_over_quota(fh, over_tids)
                pending = False
            fh.write(line + b"\n")
        if pending:
            _write_over_quota(fh, over_tids)


def _write_over_quota(fh: Any, tids: np.ndarray) -> None:
    """The exclusion log's over-quota lines, `tids` sorted (as bytes: the order of their str for UTF-8)."""
    for tid in tids.tolist():
        fh.write(dumps({"trace_id": tid.decode(), "reason": _OVER_QUOTA}) + b"\n")


# ---------------------------------------------------------------- 6. accounting
def accounting(traces: int, fates: Counter, rejects_path: Path) -> dict[str, Any]:
    """raw records = redact's rejects (with a line) + one fate per trace, or the stage fails."""
    redact_rejects = sum(1 for r in read_models(rejects_path, Reject) if r.line > 0)
    raw_rows = traces + redact_rejects
    acc = {"raw_records": raw_rows, "redact_rejected": redact_rejects, **{k: fates[k] for k in sorted(fates)}}
    acc["ok"] = raw_rows == redact_rejects + sum(fates.values())
    if not acc["ok"]:
        raise RuntimeError(f"accounting broken: {acc}")
    return acc


# ---------------------------------------------------------------- the build
def build(traces_path: Path, rejects_path: Path, export_dir: Path, out_dir: Path,
          params: BuildDatasetParams, redactor: Redactor, canaries: Canaries | None = None,
          workers: int = 1) -> dict[str, Any]:
    """The passes in order. Two passes over traces.jsonl with compact per-row state (the second parses
    only the selected rows); rows, the exclusion log and the outputs go through temp files
    (SpillSort), so memory stays flat as the snapshot grows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_path = export_dir / "eval-cases.jsonl"
    eval_at = register_eval(eval_path)
    state = _State(params, NearDedup(params), RowScanner(redactor, canaries or Canaries()), eval_at, str(eval_path))
    executor = Executor(workers)
    with tempfile.TemporaryDirectory(prefix=".build_dataset.", dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        fates = _Fates(tmp)
        blocks = list(line_blocks(traces_path))
        pool = pool_pass(executor, state, blocks, fates, tmp)
        check_export(pool, export_dir, eval_at)
        keep = dedup_pass(pool, state.near, fates)
        split_of, chosen_rid, bucket_report, over_tids = mix_and_split(pool, keep, params, fates)
        del keep
        written = write_pass(executor, state, blocks, pool, split_of, chosen_rid, tmp)
        digests = write_splits(out_dir, {**written["rows"], "eval": pool.eval_rows})
        write_exclusions(out_dir / EXCLUDED, fates.log, over_tids)
    f = fates.fates
    return {"accounting": accounting(pool.stats["traces"], f, rejects_path), "fates": f, "filtered": fates.filtered,
            "ineligible": fates.ineligible, "stats": pool.stats, "buckets": bucket_report, "digests": digests,
            "rescan": pool.rescan, "lengths": written["lengths"], "workflows": written["workflows"],
            "outcomes": written["outcomes"], "n_eval": len(pool.eval_keys), "files": dict(sorted(pool.files.items()))}


# ---------------------------------------------------------------- the manifest
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


def run(args: argparse.Namespace) -> DatasetManifest:
    params = load_params(args.params, "build_dataset", BuildDatasetParams)
    rp = load_params(args.params, "redact", RedactParams)
    res = build(args.traces, args.rejects, args.export, args.out, params, redactor_from(rp), canaries_from(rp),
                workers=worker_count(params.workers))
    inputs = {"traces": args.traces, "rejects": args.rejects,
              "training_examples": args.export / "training-examples.jsonl", "eval_cases": args.export / "eval-cases.jsonl"}
    man = manifest(res, params, {k: file_digest(p) for k, p in inputs.items()})
    write_json(args.manifest, man)
    return DatasetManifest.model_validate(man)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("traces", "rejects", "export", "out", "manifest"):
        ap.add_argument(f"--{name}", required=True, type=Path)
    ap.add_argument("--params", required=True)
    man = run(ap.parse_args(argv))
    b, acc, dup = man.build, man.accounting, man.duplicates
    print(f"build_dataset: {acc['raw_records']} records -> train {b.train_examples}, val {b.val_examples}, "
          f"eval {b.eval_examples}; "
          f"dup exact {dup['exact']}, near {dup['near']}, filtered {man.qc.rejected_low_signal}; "
          f"redaction_ok={b.redaction_ok}")


if __name__ == "__main__":
    main()
