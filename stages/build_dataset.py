"""build_dataset: export's training pool + eval cases -> train/val/eval splits and a manifest.

Quality filters, exact and near dedup, ratio mixing and a hash-stable split. Every redacted
trace ends in exactly one fate (ineligible, eval, filtered, deduplicated against a named
survivor, over quota, train or val); the stage fails if that accounting does not add up.
"""
from __future__ import annotations

import argparse
import bisect
import os
import re
import tempfile
from array import array
from collections import Counter
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import numpy as np
import orjson
import xxhash
from datasketch import MinHashLSH

from schemas.params import BuildDatasetParams, RedactParams
from schemas.records import DatasetManifest, SplitRow
from stages.core import (SpillSort, atomic_open, block_lines, content_id, dumps, line_blocks, load_params,
                         progress, read_jsonl, unit_hash, write_json)
from stages.chat import reference_text
from stages.detectors import BATCH_SEP, Redactor
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


def _text(m: dict) -> str:
    """A turn's words for near dedup: its text and, for a call, the tool's name and arguments (two answers
    that call different tools, or with different arguments, are not the same example)."""
    calls = m.get("tool_calls")
    if not calls:
        return m.get("content", "")
    return " ".join([m.get("content", "")] + [f"{c['function']['name']} {c['function']['arguments']}" for c in calls])


def shingles(messages: list[dict], n: int) -> set[bytes]:
    words = _WORD.findall(" ".join(_text(m) for m in messages if m["role"] != "system").lower())
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


_PRIME = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)
_SHIFT61 = np.uint64(61)
# ASCII bytes that are not \w (letters, digits, _) become spaces: for ASCII text, split() after
# this translate gives exactly _WORD.findall's words, without the regex engine.
_NON_WORD = bytes(c if chr(c).isalnum() or c == 0x5F else 0x20 for c in range(128)) + b" " * 128
_SIG_BATCH = 32  # rows per vectorised signature batch: small enough that the arrays stay in cache


def _mod_prime_low32(x: np.ndarray) -> None:
    """x = (x % (2^61 - 1)) & (2^32 - 1), in place, for a uint64 array, without a division (% is
    most of the signature's cost): fold the top 3 bits onto the low 61, then subtract p at most once."""
    t = x >> _SHIFT61
    x &= _PRIME
    x += t  # now x < p + 8 and congruent to the original mod p
    np.greater_equal(x, _PRIME, out=t)
    t *= _PRIME
    x -= t
    x &= _MAX32


def _words(messages: list[dict]) -> list[bytes]:
    """shingles()' words, as UTF-8 bytes."""
    text = " ".join(_text(m) for m in messages if m["role"] != "system").lower()
    if text.isascii():
        return text.encode().translate(_NON_WORD).split()
    return [w.encode() for w in _WORD.findall(text)]


def shingle_hashes(messages: list[dict], n: int) -> np.ndarray:
    """xxh32 of every shingle (shingles() as a list: a repeated shingle can't change a minimum)."""
    words = _words(messages)
    if len(words) <= n:
        return np.array([xxhash.xxh32_intdigest(b" ".join(words))], dtype=np.uint64)
    # zip of the word list shifted 0..n-1 yields each n-gram as a tuple: join and hash run in C (map),
    # with no Python frame per shingle.
    grams = zip(*[words[k:] for k in range(n)])
    return np.fromiter(map(xxhash.xxh32_intdigest, map(b" ".join, grams)), dtype=np.uint64,
                       count=len(words) - n + 1)


class NearDedup:
    """MinHash + LSH: sub-quadratic near-duplicate search; survivors are checked by estimated Jaccard.

    Signatures are datasketch's (universal hashing (a*h + b) mod p of xxh32 shingle hashes, the
    permutations of RandomState(1)), computed vectorised over a batch of rows x shingles x
    permutations, and kept as one compact uint32 row each. The LSH index is datasketch's scheme with
    its own (b, r) split for this threshold: a row is a candidate of another when one band of r
    values is equal. `find` is the row-at-a-time form (used by the bench probe); `build` runs the
    same decisions over whole arrays (near_duplicates below).
    """

    def __init__(self, params: BuildDatasetParams):
        self.threshold = params.near_dedup_threshold
        self.num_perm = params.near_dedup_num_perm
        self.n = params.near_dedup_shingle
        # Only the band split is taken from datasketch's index, which is otherwise not used.
        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self.b, self.r = lsh.b, lsh.r
        rng = np.random.RandomState(1)
        self._a = rng.randint(1, int(_PRIME), self.num_perm, dtype=np.uint64)
        self._b = rng.randint(0, int(_PRIME), self.num_perm, dtype=np.uint64)
        self._tables: list[dict[bytes, list[str]]] = [{} for _ in range(self.b)]
        self.sigs: dict[str, np.ndarray] = {}

    def signatures(self, hashes: list[np.ndarray]) -> np.ndarray:
        """One uint32 signature row per entry of `hashes` (the shingle hashes of a row)."""
        out = np.empty((len(hashes), self.num_perm), dtype=np.uint32)
        for i in range(0, len(hashes), _SIG_BATCH):
            batch = hashes[i:i + _SIG_BATCH]
            # Permutations x shingles (this way round, the per-row minimum is a contiguous reduction).
            x = np.multiply.outer(self._a, np.concatenate(batch))  # uint64, wrapping as datasketch's does
            x += self._b[:, None]
            _mod_prime_low32(x)
            starts = np.zeros(len(batch), dtype=np.intp)
            np.cumsum([len(b) for b in batch[:-1]], out=starts[1:])
            out[i:i + len(batch)] = np.minimum.reduceat(x, starts, axis=1).T
        return out

    def signature(self, messages: list[dict]) -> np.ndarray:
        """One row's signature (build signs rows in batches with signatures(); the same values)."""
        x = np.multiply.outer(self._a, shingle_hashes(messages, self.n))
        x += self._b[:, None]
        # For one row, fewer numpy calls beat the division-free fold of signatures().
        return ((x % _PRIME) & _MAX32).min(axis=1).astype(np.uint32)

    def _bands(self, sig: np.ndarray) -> list[bytes]:
        return [sig[i * self.r:(i + 1) * self.r].tobytes() for i in range(self.b)]

    def find(self, key: str, sig: np.ndarray) -> str | None:
        """The surviving row this one nearly duplicates (least key), or None (then it becomes a survivor)."""
        cands = {c for table, band in zip(self._tables, self._bands(sig)) for c in table.get(band, ())}
        best = None
        for cand in cands:
            if float(np.mean(self.sigs[cand] == sig)) >= self.threshold and (best is None or cand < best):
                best = cand
        if best is None:
            for table, band in zip(self._tables, self._bands(sig)):
                table.setdefault(band, []).append(key)
            self.sigs[key] = sig
        return best


def near_duplicates(near: NearDedup, sig_file: Path, band_hash: np.ndarray, order: np.ndarray,
                    keys: np.ndarray) -> np.ndarray:
    """For each row (slot), the slot of the survivor it nearly duplicates, or -1.

    Rows are taken in `order`; a row is compared with the survivors before it that share one band
    with it and joins them when none is similar enough: NearDedup.find's decisions, row for row.
    A row whose bands all differ from every other row's can have no candidate and be no one's
    candidate, so it is a survivor without a look; only rows sharing a band hash with another row
    (a few percent) are read back from `sig_file` and walked one by one.
    """
    n = len(band_hash)  # every slot; only those in `order` take part (the others are exact duplicates)
    out = np.full(n, -1, dtype=np.int64)
    if len(order) == 0:
        return out
    part = np.sort(order)
    shared = np.zeros(len(part), dtype=bool)
    group = np.zeros((n, near.b), dtype=np.int64)
    for i in range(near.b):
        _, inv, counts = np.unique(band_hash[part, i], return_inverse=True, return_counts=True)
        shared |= counts[inv] > 1
        group[part, i] = inv
    slots = part[shared]
    if len(slots) == 0:
        return out
    # Read back the signatures of the shared rows only, chunk by chunk (the file holds all of them).
    sig = np.empty((len(slots), near.num_perm), dtype=np.uint32)
    row_bytes = 4 * near.num_perm
    chunk = 1 << 14
    with open(sig_file, "rb") as fh:
        for lo in range(0, n, chunk):
            want = slots[(slots >= lo) & (slots < lo + chunk)]
            if len(want) == 0:
                continue
            fh.seek(lo * row_bytes)
            block = np.frombuffer(fh.read(min(chunk, n - lo) * row_bytes), dtype=np.uint32).reshape(-1, near.num_perm)
            sig[np.searchsorted(slots, want)] = block[want - lo]
    where = np.full(n, -1, dtype=np.int64)
    where[slots] = np.arange(len(slots))
    r, thr = near.r, near.threshold
    tables: list[dict[int, list[int]]] = [{} for _ in range(near.b)]
    rank = np.zeros(n, dtype=np.int64)
    rank[order] = np.arange(len(order))
    for s in slots[np.argsort(rank[slots], kind="stable")].tolist():
        me = sig[where[s]]
        cands = set()
        for i, table in enumerate(tables):
            for c in table.get(int(group[s, i]), ()):
                # Equal band hashes are only a hint: datasketch's buckets hold equal band values.
                if np.array_equal(sig[where[c], i * r:(i + 1) * r], me[i * r:(i + 1) * r]):
                    cands.add(c)
        best = -1
        for c in cands:
            if float(np.mean(sig[where[c]] == me)) >= thr and (best < 0 or keys[c] < keys[best]):
                best = c
        if best < 0:
            for i, table in enumerate(tables):
                table.setdefault(int(group[s, i]), []).append(s)
        out[s] = best
    return out


# ---------------------------------------------------------------- the build
def _meta(ex: dict) -> dict:
    return ex["metadata"]


def _eval_offsets(path: Path) -> dict[str, int]:
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


class _Sigs:
    """Signatures of the near-dedup rows, in slot order: spilled to a file, a band hash each kept."""

    def __init__(self, near: NearDedup, path: Path):
        self.near, self.path = near, path
        self._fh = open(path, "wb", buffering=1 << 20)
        self._band_hash: list[np.ndarray] = []
        self.n = 0
        # Multipliers of a polynomial hash of each band's r values (collisions are checked later).
        self._mult = np.random.RandomState(2).randint(1, 1 << 62, near.r, dtype=np.uint64) | np.uint64(1)

    def add(self, sig: np.ndarray) -> None:
        """Append signature rows (the next slots)."""
        if len(sig) == 0:
            return
        self.n += len(sig)
        self._fh.write(np.ascontiguousarray(sig, dtype=np.uint32).tobytes())
        r = self.near.r
        bands = sig[:, :self.near.b * r].astype(np.uint64).reshape(len(sig), self.near.b, r)
        self._band_hash.append((bands * self._mult).sum(axis=2, dtype=np.uint64))

    def close(self) -> np.ndarray:
        self._fh.close()
        return np.concatenate(self._band_hash) if self._band_hash else np.zeros((0, self.near.b), dtype=np.uint64)


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


def build(traces_path: Path, rejects_path: Path, export_dir: Path, out_dir: Path,
          params: BuildDatasetParams, redactor: Redactor, canaries: Canaries | None = None,
          workers: int = 1) -> dict[str, Any]:
    """Two streaming passes over the inputs with compact per-row state, then one more over the
    training examples that parses only the selected rows. Rows, the exclusion log and the outputs
    go through temp files (SpillSort), so memory stays flat as the snapshot grows."""
    canaries = canaries or Canaries()
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_at = _eval_offsets(export_dir / "eval-cases.jsonl")
    init = (params, redactor, canaries, eval_at, str(export_dir / "eval-cases.jsonl"))
    pool = None
    try:
        if workers > 1:
            # Rows are parsed, filtered, keyed, signed and rescanned in worker processes, a block of
            # whole lines each; imap keeps block order, and every order-dependent decision (exact
            # dedup, signature slots, fates) stays in this process, so the outputs don't depend on
            # the worker count or timing. Forked before any per-row state exists: small workers.
            pool = get_context("fork").Pool(workers, initializer=_init_worker, initargs=init)
            run = pool.imap
        else:
            _init_worker(*init)
            run = map
        with tempfile.TemporaryDirectory(prefix=".build_dataset.", dir=out_dir) as tmp:
            return _build(traces_path, rejects_path, export_dir, out_dir, params, eval_at, run, Path(tmp))
    finally:
        if pool is not None:
            pool.terminate()


def _build(traces_path: Path, rejects_path: Path, export_dir: Path, out_dir: Path, params: BuildDatasetParams,
           eval_at: dict[str, int], run: Callable, tmp: Path) -> dict[str, Any]:
    fates: Counter = Counter()
    filtered: Counter = Counter()
    ineligible: Counter = Counter()
    excl = SpillSort(tmp)  # the exclusion log, (reason, trace id) -> its line

    def drop(tid: str, reason: str, survivor: str | None = None, kind: str = "filtered") -> None:
        fates[kind] += 1
        if kind == "filtered":
            filtered[reason] += 1
        excl.add((reason, tid), dumps({"trace_id": tid, "reason": reason, **({"survivor": survivor} if survivor else {})}))

    near = NearDedup(params)
    sigs = _Sigs(near, tmp / "signatures.bin")
    rescan: Counter = Counter()
    # Pass 1 over traces: the ones that can't train, and the eval rows (which take dedup priority).
    # Eval rows are written out as they come (sorted later); their signatures take slots 0..E-1.
    eval_rids: set[str] = set()
    eval_keys: list[str] = []
    eval_rows = SpillSort(tmp)
    stats = Counter()
    files: dict[str, dict[str, Any]] = {}
    tblocks = list(line_blocks(traces_path))
    for out, sig, block_stats, block_files in progress(run(_traces_block, tblocks), tblocks, "build_dataset traces",
                                                       lambda r: r[2]["traces"]):
        stats.update(block_stats)
        for source_file, (bucket, n) in block_files.items():
            f = files.get(source_file) or files.setdefault(source_file, {"bucket": bucket, "traces": 0})
            f["traces"] += n
        taken = []
        for r in out:
            tid, kind = r[0], r[1]
            if kind == "ineligible":
                fates["ineligible"] += 1
                ineligible[r[2][0]] += 1
                reason = f"ineligible:{','.join(r[2])}"
                excl.add((reason, tid), dumps({"trace_id": tid, "reason": reason}))
            elif kind == "filtered":
                drop(tid, f"eval_{r[2]}")
            elif kind == "eval":
                _, _, rid, row, found, k = r
                if rid in eval_rids:
                    drop(tid, "eval_duplicate", rid, kind="dedup_exact")
                    continue
                eval_rids.add(rid)
                eval_keys.append(rid)
                taken.append(k)
                fates["eval"] += 1
                if found:
                    rescan.update(found)
                eval_rows.add(xxhash.xxh3_64_intdigest(row), row)
        sigs.add(sig[taken])
    n_eval_cases = len(eval_at)

    # Pass 2 over the training pool: filters, eval overlap, and the compact columns of every row that
    # passed them. Exact duplicates among these are found afterwards, over the whole column at once.
    rid_col, tid_col, created_col = _Column(), _Column(), _Column()
    line_no = array("q")  # the line (index in the file) of each row in the columns
    bucket_names: dict[str, int] = {}
    bucket_code = bytearray()
    n_examples = 0
    blocks = list(line_blocks(export_dir / "training-examples.jsonl"))
    block_rows = []  # rows (non-blank lines) of each block, to hand pass 3 its slice of split_of
    for out, sig in progress(run(_examples_block, blocks), blocks, "build_dataset examples", lambda r: len(r[0])):
        block_rows.append(len(out))
        taken = []
        for r in out:
            j = n_examples
            n_examples += 1
            tid, reason = r[0], r[1]
            if reason:
                drop(tid, reason)
                continue
            _, _, rid, bucket, created, k = r
            if rid in eval_rids:
                drop(tid, "eval_overlap", rid, kind="eval_overlap")
                continue
            rid_col.append(rid.encode())
            tid_col.append(tid.encode())
            created_col.append(created.encode())
            bucket_code.append(bucket_names.setdefault(bucket, len(bucket_names)))
            line_no.append(j)
            taken.append(k)
        sigs.add(sig[taken])
    line_idx = np.frombuffer(line_no, dtype=np.int64)
    if n_examples + n_eval_cases != stats["traces"] - fates["ineligible"]:
        raise RuntimeError(f"export and redact disagree: {n_examples} examples + {n_eval_cases} eval cases "
                           f"!= {stats['traces'] - fates['ineligible']} trainable traces")
    rids, tids, created = rid_col.array(), tid_col.array(), created_col.array()
    buckets = np.frombuffer(bytes(bucket_code), dtype=np.uint8)
    band_hash = sigs.close()
    n_eval = len(eval_keys)

    # Exact duplicates in the pool: the first occurrence in file order is the candidate.
    first = np.zeros(len(rids), dtype=bool)
    if len(rids):
        first[np.unique(rids, return_index=True)[1]] = True
    for k in np.flatnonzero(~first).tolist():
        drop(tids[k].decode(), "dedup_exact", rids[k].decode(), kind="dedup_exact")

    # Near dedup: eval rows first (file order), then candidates in (created_at, id) order, so that an
    # old survivor stays the survivor when new data arrives. Slots: eval rows, then pool rows.
    cand = np.flatnonzero(first)
    cand = cand[np.lexsort((rids[cand], created[cand]))]
    keys = np.concatenate([np.array(eval_keys, dtype="S32"), rids]) if n_eval else rids
    del eval_keys
    survivor_of = near_duplicates(near, sigs.path, band_hash, np.concatenate([np.arange(n_eval), n_eval + cand]), keys)
    (sigs.path).unlink()
    pool_survivor = survivor_of[n_eval:]
    keep = np.zeros(len(rids), dtype=bool)
    keep[cand] = True
    for k in np.flatnonzero(keep & (pool_survivor >= 0)).tolist():
        s = int(pool_survivor[k])
        kind = "eval_overlap" if s < n_eval else "dedup_near"
        drop(tids[k].decode(), kind, keys[s].decode(), kind=kind)
        keep[k] = False

    # Mixing: each bucket fills at most its quota, in hash order; a short bucket is reported, not refilled.
    split_of = np.zeros(n_examples, dtype=np.uint8)  # by line: 0 not selected, 1 train, 2 val
    bucket_report = {}
    over_quota: list[np.ndarray] = []
    # The configured buckets, and any other bucket that still has a row.
    names = sorted(set(params.ratios) | {b for b, c in bucket_names.items() if (keep & (buckets == c)).any()})
    for b in names:
        code = bucket_names.get(b)
        rows = np.flatnonzero(keep & (buckets == code)) if code is not None else np.zeros(0, dtype=np.int64)
        quota = round(params.ratios.get(b, 0.0) * params.target_examples)
        mix = np.fromiter((unit_hash(params.seed, "mix", rids[k].decode()) for k in rows.tolist()), dtype=np.float64,
                          count=len(rows))
        rows = rows[np.lexsort((rids[rows], mix))]
        if len(rows) > quota:  # (no key in fates when none, as before)
            fates["over_quota"] += len(rows) - quota
            over_quota.append(tids[rows[quota:]])
        chosen = rows[:quota]
        for k in chosen.tolist():
            split = "val" if unit_hash(params.seed, "split", rids[k].decode()) < params.val_ratio else "train"
            split_of[line_idx[k]] = 2 if split == "val" else 1
            fates[split] += 1
        bucket_report[b] = {"available": len(rows), "quota": quota, "selected": len(chosen),
                            "shortfall": max(quota - len(chosen), 0)}
    # Over-quota rows are most rows of a big snapshot, all with one reason: their log lines are made
    # at the end from their trace ids, sorted here, instead of going through the exclusion log's runs.
    over_tids = np.sort(np.concatenate(over_quota)) if over_quota else np.zeros(0, dtype="S1")
    del rids, tids, created, buckets, keys, band_hash, keep, line_idx, over_quota

    # Pass 3: the selected rows (only those lines are parsed), rescanned as they are written.
    lengths = {"prompt_chars": [], "answer_chars": []}
    workflows, outcomes = Counter(), Counter()
    rows_out = {"train": SpillSort(tmp), "val": SpillSort(tmp)}
    tasks, j0 = [], 0
    for block, n in zip(blocks, block_rows):
        codes = split_of[j0:j0 + n]
        j0 += n
        if codes.any():
            tasks.append((block, codes.tobytes()))
    for out in run(_selected_block, tasks):
        for code, row, found, prompt_chars, answer_chars, workflow, outcome in out:
            if found:
                rescan.update(found)
            lengths["prompt_chars"].append(prompt_chars)
            lengths["answer_chars"].append(answer_chars)
            workflows[workflow] += 1
            outcomes[outcome] += 1
            rows_out["train" if code == 1 else "val"].add(xxhash.xxh3_64_intdigest(row), row)
    del split_of

    # Each split in a stable order (by the row's xxh3_64, ties in input order), its digest as it goes.
    digests = {}
    for name, rows in (("train", rows_out["train"]), ("val", rows_out["val"]), ("eval", eval_rows)):
        h = xxhash.xxh3_128()
        with atomic_open(out_dir / f"{name}.jsonl") as fh:
            for i, (_, b) in enumerate(rows):
                if i:
                    h.update(b"\n")
                h.update(b)
                fh.write(b + b"\n")
        digests[name] = h.hexdigest()
    with atomic_open(out_dir / "rejects.jsonl") as fh:
        pending = len(over_tids) > 0
        for (reason, _), line in excl:  # (reason, trace id) order; the over-quota lines go in at their place
            if pending and reason > _OVER_QUOTA:
                _write_over_quota(fh, over_tids)
                pending = False
            fh.write(line + b"\n")
        if pending:
            _write_over_quota(fh, over_tids)

    redact_rejects = sum(1 for r in read_jsonl(rejects_path) if r["line"] > 0)
    raw_rows = stats["traces"] + redact_rejects
    acc = {"raw_records": raw_rows, "redact_rejected": redact_rejects, **{k: fates[k] for k in sorted(fates)}}
    acc["ok"] = raw_rows == redact_rejects + sum(fates.values())
    if not acc["ok"]:
        raise RuntimeError(f"accounting broken: {acc}")
    return {"accounting": acc, "fates": fates, "filtered": filtered, "ineligible": ineligible, "stats": stats,
            "buckets": bucket_report, "digests": digests, "rescan": rescan, "lengths": lengths,
            "workflows": workflows, "outcomes": outcomes, "n_eval": n_eval,
            "files": dict(sorted(files.items()))}


# ---------------------------------------------------------------- per-block work (worker processes)
_WORKER: dict[str, Any] = {}


def _init_worker(params: BuildDatasetParams, redactor: Redactor, canaries: Canaries, eval_at: dict[str, int],
                 eval_path: str) -> None:
    _WORKER.update(params=params, near=NearDedup(params), scan_row=_RowScanner(redactor, canaries),
                   eval_at=eval_at, eval_path=eval_path)


def _traces_block(block: tuple[str, int, int]) -> tuple[list[tuple], np.ndarray, Counter, dict[str, list]]:
    """Pass 1 on a block of traces: (trace id, kind, ...) for each trace that is not simply in the
    training pool, where kind is "ineligible" (+ reasons), "filtered" (+ reason) or "eval" (+ row id,
    the row's line, its rescan, its signature's index); the eval rows' signatures; the block's trace
    and redaction counts; and its source files (-> [bucket of the first trace, traces])."""
    params, near, scan_row, eval_at = (_WORKER[k] for k in ("params", "near", "scan_row", "eval_at"))
    out: list[tuple] = []
    hashes: list[np.ndarray] = []
    stats: Counter = Counter()
    files: dict[str, list] = {}
    with open(_WORKER["eval_path"], "rb") as eval_fh:
        for raw in block_lines(*block):
            t = orjson.loads(raw)
            stats["traces"] += 1
            f = files.get(t["source_file"]) or files.setdefault(t["source_file"], [t["bucket"], 0])
            f[1] += 1
            stats["rows_with_redactions"] += bool(t["redactions"])
            stats["redactions_applied"] += sum(t["redactions"].values())
            info = t["id"]
            if not t["trainable"]:
                out.append((info, "ineligible", t["ineligible"]))
                continue
            pos = eval_at.get(t["id"])
            if pos is None:
                continue
            reason = quality_reason(t["messages"], t["outcome"], params)
            if reason:
                out.append((info, "filtered", reason))
                continue
            rid = row_id(t["messages"])
            eval_fh.seek(pos)
            case = orjson.loads(eval_fh.readline())
            split_row = SplitRow(
                id=rid, source=t["source"], bucket=t["bucket"], domain=t["domain"], workflow=t["workflow"],
                messages=t["messages"], tools=t.get("tools"), trace_id=t["id"], eval_case_id=case["id"],
                expected_behavior=case["expected_behavior"], forbidden_behavior=case["forbidden_behavior"],
            ).model_dump(mode="json", exclude_none=True)
            # (the rescan is nearly always empty: None then, cheaper to send back than a Counter)
            out.append((info, "eval", rid, dumps(split_row), scan_row(split_row) or None, len(hashes)))
            hashes.append(shingle_hashes(t["messages"], near.n))
    return out, near.signatures(hashes), stats, files


def _examples_block(block: tuple[str, int, int]) -> tuple[list[tuple], np.ndarray]:
    """Pass 2 on a block of training examples: per example (trace id, filter reason) or
    (trace id, None, row id, bucket, created_at, its signature's index); and the signatures."""
    params, near = _WORKER["params"], _WORKER["near"]
    out: list[tuple] = []
    hashes: list[np.ndarray] = []
    for raw in block_lines(*block):
        meta = _meta(orjson.loads(raw))
        tid = meta["source_trace_ids"][0]
        reason = quality_reason(meta["messages"], meta.get("outcome", "unknown"), params)
        if reason:
            out.append((tid, reason))
            continue
        out.append((tid, None, row_id(meta["messages"]), meta["bucket"], meta.get("created_at") or "", len(hashes)))
        hashes.append(shingle_hashes(meta["messages"], near.n))
    return out, near.signatures(hashes)


_OVER_QUOTA = "over_quota"


def _write_over_quota(fh: Any, tids: np.ndarray) -> None:
    """The exclusion log's over-quota lines, `tids` sorted (as bytes: the order of their str for UTF-8)."""
    for tid in tids.tolist():
        fh.write(dumps({"trace_id": tid.decode(), "reason": _OVER_QUOTA}) + b"\n")


def _selected_block(task: tuple[tuple[str, int, int], bytes]) -> list[tuple]:
    """Pass 3 on a block of training examples and its split codes (0 not selected, 1 train, 2 val):
    per selected example (code, its row's line, rescan, prompt chars, answer chars, workflow, outcome)."""
    block, codes = task
    scan_row = _WORKER["scan_row"]
    out = []
    for code, raw in zip(codes, block_lines(*block)):
        if not code:
            continue
        ex = orjson.loads(raw)
        meta = _meta(ex)
        split_row = SplitRow(
            id=row_id(meta["messages"]), source=meta["source"], bucket=meta["bucket"], domain=meta["domain"],
            workflow=meta["workflow"], messages=meta["messages"], tools=meta.get("tools"),
            trace_id=meta["source_trace_ids"][0]).model_dump(mode="json", exclude_none=True)
        out.append((code, dumps(split_row), scan_row(split_row) or None, len(ex["input"]) + len(ex["instruction"]),
                    len(ex["output"]), f"{meta['domain']}/{meta['workflow']}", meta.get("outcome", "unknown")))
    return out


class _RowScanner:
    """The rescan of one output row: scan_text over each of its strings, counted per string.

    The strings are joined with the detectors' batch separator and scanned once (as redact does with
    redact_many): no finding crosses the separator, so each finding belongs to one string and the
    counts equal a scan per string. Canaries, when any are set, are still checked string by string.
    """

    def __init__(self, redactor: Redactor, canaries: Canaries):
        self.redactor, self.canaries = redactor, canaries

    def __call__(self, row: dict) -> Counter:
        texts: list[str] = []
        _strings_into(row, texts)
        found: Counter = Counter()
        hits = self.redactor.scan(BATCH_SEP.join(texts))
        if hits:
            starts, pos = [], 0
            for t in texts:
                starts.append(pos)
                pos += len(t) + len(BATCH_SEP)
            per: dict[int, set[str]] = {}
            for f in hits:
                per.setdefault(bisect.bisect_right(starts, f.start) - 1, set()).add(f.detector)
            for dets in per.values():
                found.update(dets)
        if self.canaries:
            for t in texts:
                if self.canaries.find(t):
                    found["canary"] += 1
        return found


def _strings_into(obj: Any, out: list[str]) -> None:
    """leaks.strings(obj), same order, appended to a list: plain recursion is ~2x cheaper than nested generators."""
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.append(k)
            if isinstance(v, str):  # most values: no call for them
                out.append(v)
            else:
                _strings_into(v, out)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, str):
                out.append(v)
            else:
                _strings_into(v, out)


def _rescan(row: dict, redactor: Redactor, canaries: Canaries) -> Counter:
    """The per-string reference that _RowScanner must equal."""
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
    workers = params.workers or os.cpu_count() or 1
    res = build(args.traces, args.rejects, args.export, args.out, params, redactor,
                Canaries(rp.canaries, rp.canary_sha256), workers=workers)
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
