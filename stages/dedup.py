"""Dedup keys and near-dedup, shared: the exact key of a conversation (row_id), MinHash signatures of its
word shingles, and the LSH pass that finds near duplicates. build_dataset runs them; bench/run.py times them.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import xxhash

from schemas.params import BuildDatasetParams
from stages.core import content_id

_WORD = re.compile(r"\w+", re.UNICODE)


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


def lsh_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """datasketch's band split (MinHashLSH(threshold, num_perm).b, .r): the (bands, rows) pair, b * r <= num_perm,
    that minimises the weighted false-positive and false-negative areas, the first in (b, r) order on a tie.

    Without importing datasketch, which pulls in scipy for its integrals (half a second of every build_dataset
    start-up). The integrands are polynomials of degree b * r <= num_perm, so Gauss-Legendre with num_perm / 2 + 1
    nodes integrates them exactly (up to rounding), as scipy's adaptive quadrature does; tests/test_stream_build.py
    checks the pair against datasketch's over a grid of thresholds and sizes.
    """
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 2)

    def area(lo: float, hi: float, negative: bool) -> np.ndarray:
        s = (hi - lo) / 2 * x + (hi + lo) / 2  # the nodes moved from [-1, 1] to [lo, hi]
        p = 1 - (1 - s[None, :] ** pairs[:, 1:2]) ** pairs[:, 0:1]  # P(candidate) at similarity s, per pair
        return ((1 - p) if negative else p) @ w * (hi - lo) / 2

    error = area(0.0, threshold, False) * fp_weight + area(threshold, 1.0, True) * fn_weight
    b, r = (int(v) for v in pairs[int(np.argmin(error))])  # argmin: the first of equal minima, as datasketch's `<`
    if b < 2:
        raise ValueError("The number of bands are too small (b < 2)")
    return b, r


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
    # x >= p only for 8 of 2^61 values: one max() to rule that out is cheaper than three passes that
    # subtract p where needed (a quarter of the signature's time); the rare batch still gets them.
    if x.size and x.max() >= _PRIME:
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
        self.b, self.r = lsh_bands(self.threshold, self.num_perm)
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


class Signatures:
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
