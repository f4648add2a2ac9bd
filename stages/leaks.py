"""The leak scan: every artifact the pipeline wrote, through redact's detectors plus team canaries.

A hit names the file, the line and the detector, never the value: the report itself must not leak.
Canaries are strings a team declares must never appear anywhere (or their SHA-256, so that the
params file needn't hold the secret itself).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

from stages.detectors import Redactor

TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".csv", ".txt", ".log", ".yaml", ".yml", ".jinja", ".tsv")
# Tokens a canary hash is compared against: runs of the characters keys and ids are made of.
_TOKEN = re.compile(r"[A-Za-z0-9_\-.@+/=:~]{6,}")


@dataclass(frozen=True, order=True)
class Hit:
    file: str
    line: int
    detector: str


class Canaries:
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


def scan_text(text: str, redactor: Redactor, canaries: Canaries) -> set[str]:
    found = {f.detector for f in redactor.scan(text)}
    if canaries and canaries.find(text):
        found.add("canary")
    return found


def scan_file(path: Path, name: str, redactor: Redactor, canaries: Canaries) -> list[Hit]:
    """JSON lines are decoded first, so an escaped value (\\n in a PEM block) is seen as written."""
    hits: list[Hit] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            text = raw.decode("utf-8", errors="replace")
            pieces: Iterable[str] = [text]
            if path.suffix == ".jsonl":
                try:
                    pieces = list(strings(orjson.loads(raw)))
                except orjson.JSONDecodeError:
                    pass
            found: set[str] = set()
            for s in pieces:
                found |= scan_text(s, redactor, canaries)
            hits += [Hit(name, lineno, d) for d in sorted(found)]
    if path.suffix == ".json":  # pretty-printed JSON: also check decoded strings, reported at line 0
        try:
            found = set()
            for s in strings(orjson.loads(path.read_bytes())):
                found |= scan_text(s, redactor, canaries)
            hits += [Hit(name, 0, d) for d in sorted(found) if not any(h.detector == d for h in hits)]
        except orjson.JSONDecodeError:
            pass
    return hits


def scan_paths(paths: Iterable[Path], redactor: Redactor, canaries: Canaries, root: Path | None = None) -> dict:
    """Scan files and folders; returns {"files", "skipped", "hits": [...], "by_detector": {...}}."""
    hits: list[Hit] = []
    files = skipped = 0
    for p in paths:
        for f in sorted([p] if p.is_file() else (x for x in p.rglob("*") if x.is_file())):
            name = (f.relative_to(root) if root and f.is_relative_to(root) else f).as_posix()
            if f.suffix not in TEXT_SUFFIXES:
                skipped += 1  # weights and other binaries: no text to leak through a report
                continue
            files += 1
            hits += scan_file(f, name, redactor, canaries)
    hits.sort()
    by_det: dict[str, int] = {}
    for h in hits:
        by_det[h.detector] = by_det.get(h.detector, 0) + 1
    return {"files": files, "skipped_binary": skipped, "hits": [h.__dict__ for h in hits],
            "by_detector": dict(sorted(by_det.items()))}
