"""The streaming build_dataset: each fast piece equals the plain reference it replaced.

Signatures vs the straightforward `%` formula, shingle hashes vs shingles(), the array near dedup vs
NearDedup.find row by row, the one-scan-per-row rescan vs a scan per string, SpillSort vs sorted(),
build() with tiny spill budgets or with worker processes vs build() in one process, in memory; and
line_blocks/block_lines vs iter_lines.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import xxhash

from schemas.params import BuildDatasetParams, ExportParams, RedactParams
from stages import build_dataset as bd
from stages import dedup as dd
from stages import scanning
from stages import core, export, redact
from stages.core import SpillSort, atomic_dir, read_jsonl
from stages.detectors import Redactor
from stages.scanning import Canaries

ROOT = Path(__file__).resolve().parents[1]
P = (1 << 61) - 1


# ---------------------------------------------------------------- signatures
def test_mod_prime_fold_equals_modulo_on_edge_values():
    edges = [0, 1, P - 1, P, P + 1, P + 6, P + 7, 2 * P, 2 * P + 5, (1 << 61), (1 << 62) - 1, (1 << 63),
             (1 << 64) - 1, (1 << 64) - 2, 7 * P, 7 * P + 7, 8 * P - 1]
    rng = np.random.RandomState(3)
    x = np.concatenate([np.array(edges, dtype=np.uint64), rng.randint(0, 1 << 63, 10000, dtype=np.uint64) * np.uint64(2)
                        + rng.randint(0, 2, 10000, dtype=np.uint64)])
    want = (x % np.uint64(P)) & np.uint64(0xFFFFFFFF)
    got = x.copy()
    dd._mod_prime_low32(got)
    assert (got == want).all()
    # Without an edge value in the array, the correction pass is skipped: the same results.
    y = rng.randint(0, 1 << 63, 10000, dtype=np.uint64) * np.uint64(2)
    got = y.copy()
    dd._mod_prime_low32(got)
    assert (got == (y % np.uint64(P)) & np.uint64(0xFFFFFFFF)).all()


def test_lsh_bands_equal_datasketch():
    """The band split computed here (no scipy import) is datasketch's, over a grid of thresholds and sizes."""
    from datasketch.lsh import _optimal_param

    for num_perm in (16, 32, 64, 128):
        for threshold in (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99):
            b, r = _optimal_param(threshold, num_perm, 0.5, 0.5)
            if b < 2:
                with pytest.raises(ValueError):
                    dd.lsh_bands(threshold, num_perm)
            else:
                assert dd.lsh_bands(threshold, num_perm) == (b, r), (threshold, num_perm)


def _reference_signature(near: dd.NearDedup, messages: list[dict]) -> np.ndarray:
    """The signature as build_dataset computed it before (set of shingles, outer product, %)."""
    hv = np.fromiter((xxhash.xxh32_intdigest(s) for s in dd.shingles(messages, near.n)), dtype=np.uint64)
    return np.bitwise_and((np.outer(hv, near._a) + near._b) % dd._PRIME, dd._MAX32).min(axis=0)


TEXTS = ["", "one", "a b c d e", "a b c d e f", "Hello, World! hello world again and again, HELLO.",
         "snake_case words_with_underscores and digits 123 456 7890 x1y2",
         "Ünïcödé wörds: straße, ÉCOLE, naïve café; 東京 タワー and ascii words too",
         "tabs\tand\nnewlines  and   spaces, punctuation!?;:()[]{} mixed-in",
         " ".join(f"w{i % 37}" for i in range(400))]


def _msgs(text: str) -> list[dict]:
    return [{"role": "system", "content": "system words never count"}, {"role": "user", "content": text},
            {"role": "assistant", "content": text[::-1]}]


def test_shingle_hashes_are_the_shingles_hashes():
    for t in TEXTS:
        m = _msgs(t)
        assert set(dd.shingle_hashes(m, 5).tolist()) == {xxhash.xxh32_intdigest(s) for s in dd.shingles(m, 5)}


def test_signatures_equal_the_reference_formula():
    near = dd.NearDedup(BuildDatasetParams())
    rows = [_msgs(t) for t in TEXTS] + [_msgs(" ".join(random.Random(i).choices(["alpha", "beta", "gamma", "delta",
                                                                                   "eps", "zeta"], k=60)))
                                       for i in range(70)]
    sigs = near.signatures([dd.shingle_hashes(m, near.n) for m in rows])
    assert sigs.dtype == np.uint32 and sigs.shape == (len(rows), near.num_perm)
    for m, s in zip(rows, sigs):
        assert (s == _reference_signature(near, m)).all()
        assert (near.signature(m) == s).all()


# ---------------------------------------------------------------- near dedup over arrays
def _planted_signatures(n: int, seed: int, near: dd.NearDedup) -> np.ndarray:
    """Random rows plus near copies (a few values changed) and band-only look-alikes (one band equal,
    the rest different: candidates that must be rejected by similarity)."""
    rng = np.random.RandomState(seed)
    sig = rng.randint(0, 1 << 32, (n, near.num_perm), dtype=np.uint64).astype(np.uint32)
    for i in range(1, n):
        j = rng.randint(0, i)
        kind = rng.randint(0, 5)
        if kind == 0:  # near copy: 1-6 values differ (similarity 58/64 .. 63/64, spread over bands)
            sig[i] = sig[j]
            pos = rng.choice(near.num_perm, rng.randint(1, 7), replace=False)
            sig[i, pos] = rng.randint(0, 1 << 32, len(pos), dtype=np.uint64).astype(np.uint32)
        elif kind == 1:  # one band equal only
            b = rng.randint(0, near.b)
            sig[i, b * near.r:(b + 1) * near.r] = sig[j, b * near.r:(b + 1) * near.r]
    return sig


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_duplicates_equal_row_by_row_find(tmp_path, seed):
    near = dd.NearDedup(BuildDatasetParams())
    n, n_eval = 600, 80
    sig = _planted_signatures(n, seed, near)
    keys = np.array([f"{xxhash.xxh3_128_hexdigest(str(i).encode())}" for i in range(n)], dtype="S32")
    rng = np.random.RandomState(seed + 10)
    # Some pool slots don't take part (exact duplicates); the pool is taken in a shuffled order.
    pool = np.arange(n_eval, n)
    pool = pool[rng.rand(len(pool)) > 0.1]
    order = np.concatenate([np.arange(n_eval), rng.permutation(pool)])
    sig_file = tmp_path / "sigs.bin"
    sig_file.write_bytes(sig.tobytes())
    s = dd.Signatures(near, tmp_path / "unused.bin")
    s._pending = []
    band = sig[:, :near.b * near.r].astype(np.uint64).reshape(n, near.b, near.r)
    band_hash = (band * s._mult).sum(axis=2, dtype=np.uint64)
    s._fh.close()
    got = dd.near_duplicates(near, sig_file, band_hash, order, keys)

    ref = dd.NearDedup(BuildDatasetParams())
    want = np.full(n, -1)
    for slot in order.tolist():
        found = ref.find(keys[slot].decode(), sig[slot])
        if found is not None:
            want[slot] = [k.decode() for k in keys].index(found)
    assert (got == want).all()
    assert (want >= 0).sum() > 20, "the planted near copies were found"


def test_near_duplicates_with_colliding_band_hashes(tmp_path):
    """Equal band hashes with different band values must not make candidates (datasketch keys on values)."""
    near = dd.NearDedup(BuildDatasetParams())
    sig = _planted_signatures(200, 5, near)
    band_hash = np.zeros((200, near.b), dtype=np.uint64)  # every row collides with every other
    sig_file = tmp_path / "sigs.bin"
    sig_file.write_bytes(sig.tobytes())
    keys = np.array([f"{i:032x}" for i in range(200)], dtype="S32")
    order = np.arange(200)
    got = dd.near_duplicates(near, sig_file, band_hash, order, keys)
    ref = dd.NearDedup(BuildDatasetParams())
    want = [-1 if (f := ref.find(keys[i].decode(), sig[i])) is None else int(f, 16) for i in range(200)]
    assert got.tolist() == want


# ---------------------------------------------------------------- rescan
def test_row_scan_equals_a_scan_per_string():
    from tests.test_detectors import TRUE_POSITIVES  # detector vectors with real secrets in them

    red = Redactor()
    rng = random.Random(4)
    texts = [t for _, _, t, _ in TRUE_POSITIVES] + ["plain words", "", "ok", "password", "key:", "token =",
                                                     "ops@corp.io", "a" * 30, "\n"]
    for canaries in (Canaries(), Canaries(["sekrit-canary-value"])):
        scan = scanning.RowScanner(red, canaries)
        for _ in range(150):
            row = {"id": "x", "messages": [{"role": rng.choice(["user", "assistant"]), "content": rng.choice(texts)}
                                           for _ in range(rng.randint(1, 5))],
                   "tools": [{"function": {"name": rng.choice(texts), "parameters": {rng.choice(texts): [rng.choice(texts)]}}}],
                   "note": rng.choice(texts) + " sekrit-canary-value"}
            assert scan(row) == scanning.rescan(row, red, canaries), row
        assert sum(scan({"m": [t for t, in zip(texts)]}).values()) > 10


@pytest.mark.parametrize("canaries", [Canaries(), Canaries(["sekrit-canary-value"])])
def test_rescan_with_the_prefilter_equals_the_full_scan(canaries):
    """build_dataset's rescan skips rows the compiled prefilter clears: the counts must be a full scan's,
    for rows with real secrets in any string (content, tool calls, tool schemas, keys) and plain rows."""
    from tests.test_detectors import TRUE_POSITIVES

    red = Redactor()
    if not red.has_compiled_prefilter:
        pytest.skip("Hyperscan is not installed: every row takes the full scan")
    state = bd._State(BuildDatasetParams(), None, scanning.RowScanner(red, canaries), {}, "")
    rng = random.Random(7)
    secrets = [t for _, _, t, _ in TRUE_POSITIVES] + ["sekrit-canary-value"]
    plain = ["plain words about the weather", "Summarise the ticket in one line.", "ok", "[tool] done", "a" * 30]
    cleared = 0
    for i in range(400):
        texts = plain if i % 2 else plain + secrets
        row = {"id": xxhash.xxh3_128_hexdigest(str(i).encode()), "source": "s", "bucket": "real", "domain": "d", "workflow": "w", "trace_id": "t",
               "messages": [{"role": rng.choice(["user", "assistant"]), "content": rng.choice(texts)}
                            for _ in range(rng.randint(1, 4))]
               + [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
                   "name": "lookup", "arguments": core.dumps({"q": rng.choice(texts)}).decode()}}]}],
               "tools": [{"function": {"name": "lookup", "parameters": {rng.choice(texts): [rng.choice(texts)]}}}]}
        line = core.dumps(row)
        full = state.scan_row(row) or None
        assert state.rescan(row, line) == full, row
        cleared += red.nothing_to_find(line) and not canaries
    if not canaries:
        assert cleared > 50  # the prefilter does clear plain rows (else this test would prove nothing)


# ---------------------------------------------------------------- SpillSort
@pytest.mark.parametrize("budget", [1, 500, 1 << 30])
def test_spill_sort_equals_a_stable_sort(tmp_path, budget):
    rng = random.Random(1)
    recs = [((rng.choice("abc"), rng.randint(0, 20)), f"{i}".encode() * rng.randint(1, 5)) for i in range(2000)]
    ss = SpillSort(tmp_path, budget=budget)
    for k, v in recs:
        ss.add(k, v)
    assert list(ss) == sorted(recs, key=lambda r: r[0])
    assert ss.count == len(recs)


# ---------------------------------------------------------------- the whole build, spilled or not
def test_build_is_the_same_with_tiny_spill_budgets(tmp_path, key, monkeypatch):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(ROOT / "examples/snapshot", raw)
    work = tmp_path / "w"
    (work / "redact").mkdir(parents=True)
    redact.run(raw, work / "redact/traces.jsonl", work / "redact/rejects.jsonl", RedactParams(workers=1), key)
    with atomic_dir(work / "export") as tmp:
        export.export_file(work / "redact/traces.jsonl", tmp, ExportParams())
    bp = BuildDatasetParams(min_examples=0, target_examples=300)

    def run(out: Path, workers: int = 1) -> dict:
        res = bd.build(work / "redact/traces.jsonl", work / "redact/rejects.jsonl", work / "export", out, bp, Redactor(),
                       workers=workers)
        return bd.manifest(res, bp, {})

    m1 = run(work / "a")
    assert run(work / "c", workers=2) == m1  # worker processes: the same build
    for name in ("train", "val", "eval", "excluded"):
        assert (work / "a" / f"{name}.jsonl").read_bytes() == (work / "c" / f"{name}.jsonl").read_bytes()
    real_init = core.SpillSort.__init__
    monkeypatch.setattr(core.SpillSort, "__init__", lambda self, d, budget=0: real_init(self, d, budget=2000))
    monkeypatch.setattr(dd, "_SIG_BATCH", 3)
    m2 = run(work / "b")
    assert m1 == m2
    for name in ("train", "val", "eval", "excluded"):
        assert (work / "a" / f"{name}.jsonl").read_bytes() == (work / "b" / f"{name}.jsonl").read_bytes()
    assert not [p for p in (work / "a").iterdir() if p.name.startswith(".")], "no temp files left behind"
    acc = m1["accounting"]
    assert acc["ok"] and m1["duplicates"]["near"] + m1["duplicates"]["exact"] > 0
    assert Counter(r["reason"] for r in read_jsonl(work / "a" / bd.EXCLUDED))["over_quota"] == acc["over_quota"]


@pytest.mark.parametrize("block", [1, 64, 4096, 1 << 20])
def test_line_blocks_read_back_as_iter_lines(tmp_path, block):
    rng = random.Random(block)
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b"".join(rng.choice([b"", b"  ", b"x" * rng.randint(1, 300), b"ab\r", b"{}"]) + b"\n"
                                             for _ in range(500)) + b"no newline at the end")
    got = [line for b in core.line_blocks(p, block) for line in core.block_lines(*b)]
    assert got == [line for _, line in core.iter_lines(p)]
