"""Shared scanning: canaries, walking a JSON value's strings, one detector scan per string, and the
Redactor built from params. Used by build_dataset (its rescan of every output row), gate (its scan of
its own outputs) and leaks, so that a stage never imports another stage's module.

The same definitions as leaks.py's (which re-exports these once the redaction work is merged): one
scanner, so the rescan, the leak scan and the gate agree on what a finding is.
"""
from __future__ import annotations

import bisect
import hashlib
import re
from collections import Counter
from typing import Any, Iterable, Iterator

from schemas.params import RedactParams
from stages.detectors import BATCH_SEP, Redactor

# Tokens a canary hash is compared against: runs of the characters keys and ids are made of.
_TOKEN = re.compile(r"[A-Za-z0-9_\-.@+/=:~]{6,}")


class Canaries:
    """Strings that must never appear in an output, given as themselves or by their SHA-256."""

    def __init__(self, plain: Iterable[str] = (), sha256: Iterable[str] = ()):
        self.plain = [c for c in plain if c]
        self.hashes = {h.lower() for h in sha256}

    def __bool__(self) -> bool:
        return bool(self.plain or self.hashes)

    def find(self, text: str) -> bool:
        if any(c in text for c in self.plain):
            return True
        if self.hashes:
            for tok in _TOKEN.findall(text):
                for cand in (tok, tok.strip(".:=/")):
                    if hashlib.sha256(cand.encode()).hexdigest() in self.hashes:
                        return True
        return False


def canaries_from(rp: RedactParams) -> Canaries:
    return Canaries(rp.canaries, rp.canary_sha256)


def redactor_from(rp: RedactParams) -> Redactor:
    """The same detectors, with the same settings, as the redact stage."""
    return Redactor(ip_public_only=rp.ip_public_only, entropy_threshold=rp.entropy_threshold,
                    entropy_min_len=rp.entropy_min_len, disabled=frozenset(rp.disabled_detectors),
                    keep_documentation_emails=rp.keep_documentation_emails, names=rp.names)


def strings(obj: Any) -> Iterator[str]:
    """Every string of a JSON value, dict keys included."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def strings_into(obj: Any, out: list[str]) -> None:
    """strings(obj), same order, appended to a list: plain recursion is ~2x cheaper than nested generators."""
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.append(k)
            if isinstance(v, str):  # most values: no call for them
                out.append(v)
            else:
                strings_into(v, out)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, str):
                out.append(v)
            else:
                strings_into(v, out)


def rebuild_strings(obj: Any, it: Iterator[str]) -> Any:
    """A copy of a JSON value with each string (dict keys included) taken from `it`, in strings_into's
    order: what a redactor returns for `strings_into`'s list, put back in place."""
    if isinstance(obj, str):
        return next(it)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            nk = next(it)
            out[nk] = rebuild_strings(v, it)
        return out
    if isinstance(obj, list):
        return [rebuild_strings(v, it) for v in obj]
    return obj


def scan_text(text: str, redactor: Redactor, canaries: Canaries) -> set[str]:
    """The detectors (and "canary") that fire on one string."""
    found = {f.detector for f in redactor.scan(text)}
    if canaries and canaries.find(text):
        found.add("canary")
    return found


class RowScanner:
    """scan_text over each string of a JSON row, counted per string (detector -> strings it fired on).

    The strings are joined with the detectors' batch separator and scanned once (as redact does with
    redact_many): no finding crosses the separator, so each finding belongs to one string and the
    counts equal a scan per string (`rescan` below is that reference). Canaries, when any are set, are
    still checked string by string.
    """

    def __init__(self, redactor: Redactor, canaries: Canaries):
        self.redactor, self.canaries = redactor, canaries

    def __call__(self, row: Any) -> Counter:
        texts: list[str] = []
        strings_into(row, texts)
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


def rescan(row: Any, redactor: Redactor, canaries: Canaries) -> Counter:
    """The per-string reference that RowScanner must equal."""
    found: Counter = Counter()
    for s in strings(row):
        found.update(scan_text(s, redactor, canaries))
    return found
