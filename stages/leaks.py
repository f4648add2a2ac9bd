"""leaks: scan every artifact the pipeline wrote, through redact's detectors plus team canaries.

    python -m stages.leaks --params params.yaml --out data/leaks --scan data/redact data/export ...

A hit names the file, the line and the detector, never the value: the report itself must not leak.
Canaries are strings a team declares must never appear anywhere (or their SHA-256, so that the
params file needn't hold the secret itself). They are tripwires, not redaction rules: redact does not
look for them, so a canary that reaches an artifact proves that something slipped past the detectors.
The gate blocks on any hit (data/leaks/leak_report.json -> gate_decision.json `leak_scan_ok`).
"""
from __future__ import annotations

import argparse
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

from schemas.params import LeaksParams, RedactParams
from schemas.records import LeakReport
from stages.core import load_params, write_json
from stages.detectors import DETECTORS, Redactor, structural_secrets
from stages.executor import Executor, worker_count
from stages.scanning import Canaries, redactor_from, scan_text, strings  # noqa: F401 (strings: re-exported)

TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".csv", ".txt", ".log", ".yaml", ".yml", ".jinja", ".tsv")


@dataclass(frozen=True, order=True)
class Hit:
    file: str
    line: int
    detector: str


def pairs(obj: Any) -> Iterator[tuple[str, str]]:
    """Every (key, string value) of every object in a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str):
                yield k, v
            else:
                yield from pairs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from pairs(v)


def scan_json(obj: Any, redactor: Redactor, canaries: Canaries, _depth: int = 0) -> dict[str, str]:
    """detector -> the first string it fires on, for a decoded JSON value: each string alone, plus
    redact's key=value rule on object members (`{"password": "..."}`), as redact sees a record. JSON
    punctuation is never scanned as text, so `"pass": 1734` in a tokenizer's vocabulary is no finding."""
    found: dict[str, str] = {}
    for piece in strings(obj):
        for d in scan_text(piece, redactor, canaries):
            found.setdefault(d, piece)
        # A string holding JSON (tool-call arguments, a tool result, a double-encoded record): its
        # structure names secrets too.
        if _depth < 3 and piece[:1] in "{[" and (inner := _json_inside(piece)) is not None:
            for d, v in scan_json(inner, redactor, canaries, _depth + 1).items():
                found.setdefault(d, v)
    # Keyed values re-derived from the artifact's own structure (`"password": ...`, a sibling name
    # field, a schema default): redact replaced each with a placeholder, so one still there is a leak.
    for v, det, _ in structural_secrets(obj, redactor):
        found.setdefault(det, v)
    return found


def _json_inside(text: str) -> Any:
    """The JSON value a string holds (`"{\\"password\\": ...}"`), or None."""
    t = text.strip()
    if len(t) < 2 or t[0] not in "{[" or t[-1] not in "}]":
        return None
    try:
        return orjson.loads(t)
    except orjson.JSONDecodeError:
        return None


def _line_hits(suffix: str, raw: bytes, redactor: Redactor, canaries: Canaries) -> list[str]:
    """Detectors that fire on one physical line. A JSON line is decoded first, so an escaped value
    (\n inside a PEM block, \u0040 for @) is seen as written; a line that isn't JSON is scanned as text."""
    if suffix in (".jsonl", ".json") and raw.strip():
        try:
            return sorted(scan_json(orjson.loads(raw), redactor, canaries))
        except orjson.JSONDecodeError:
            pass
    return sorted(scan_text(raw.decode("utf-8", errors="replace"), redactor, canaries))


def _safetensors_header(path: Path) -> bytes | None:
    """The JSON header of a safetensors file (names, shapes and `__metadata__`): text that can leak."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            return fh.read(n) if 0 < n < 100_000_000 else None
    except (OSError, struct.error):
        return None


def _whole_json(path: Path, redactor: Redactor, canaries: Canaries) -> list[Hit] | None:
    """A (pretty-printed) JSON file, decoded whole; each hit at the line where the string it fired on
    is written (0 when it can't be found as written). None when the file is not JSON."""
    raw = path.read_bytes()
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    hits = []
    for det, piece in scan_json(obj, redactor, canaries).items():
        at = raw.find(orjson.dumps(piece)[1:-1]) if piece else -1
        hits.append(Hit(path.name, raw.count(b"\n", 0, at) + 1 if at >= 0 else 0, det))
    return hits


def scan_file(path: Path, name: str, redactor: Redactor, canaries: Canaries) -> list[Hit]:
    if path.suffix == ".json":
        whole = _whole_json(path, redactor, canaries)
        if whole is not None:
            return [Hit(name, h.line, h.detector) for h in whole]
    hits: list[Hit] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            hits += [Hit(name, lineno, d) for d in _line_hits(path.suffix, raw, redactor, canaries)]
    return hits


def _files(paths: Iterable[Path], root: Path | None) -> Iterator[tuple[Path, str]]:
    for p in paths:
        for f in sorted([p] if p.is_file() else (x for x in p.rglob("*") if x.is_file())):
            yield f, (f.relative_to(root) if root and f.is_relative_to(root) else f).as_posix()


# ---------------------------------------------------------------- parallel scan (the stage)
def _work(state: tuple[Redactor, Canaries], batch: tuple[str, str, int, list[bytes]]) -> list[Hit]:
    name, suffix, first, lines = batch
    redactor, canaries = state
    return [Hit(name, first + i, d) for i, raw in enumerate(lines)
            for d in _line_hits(suffix, raw, redactor, canaries)]


def _batches(files: list[tuple[Path, str]], stats: Counter, size: int = 512) -> Iterator[tuple[str, str, int, list[bytes]]]:
    for path, name in files:
        with open(path, "rb") as fh:
            lines: list[bytes] = []
            first = 1
            for raw in fh:
                stats["lines"] += 1
                stats["bytes"] += len(raw)
                lines.append(raw)
                if len(lines) == size:
                    yield name, path.suffix, first, lines
                    first, lines = first + size, []
            if lines:
                yield name, path.suffix, first, lines


def scan_paths(paths: Iterable[Path], redactor: Redactor, canaries: Canaries, root: Path | None = None,
               workers: int = 1) -> dict:
    """Scan files and folders; returns {"files", "skipped_binary", "hits": [...], "by_detector": {...}}.

    Text files are scanned line by line (in `workers` processes), safetensors by their JSON header;
    other binaries are counted as skipped. The result does not depend on `workers`.
    """
    text_files: list[tuple[Path, str]] = []
    hits: list[Hit] = []
    stats: Counter = Counter()
    for f, name in _files(paths, root):
        if f.suffix == ".safetensors":
            header = _safetensors_header(f)
            stats["safetensors_headers"] += 1
            if header is None:
                hits.append(Hit(name, 0, "unreadable_safetensors_header"))
            else:
                hits += [Hit(name, 0, d) for d in _line_hits(".json", header, redactor, canaries)]
        elif f.suffix == ".json" and (whole := _whole_json(f, redactor, canaries)) is not None:
            stats["json_files"] += 1  # scanned whole, as decoded JSON
            size = f.stat().st_size
            stats["bytes"] += size
            with open(f, "rb") as fh:
                stats["lines"] += sum(1 for _ in fh)
            hits += [Hit(name, h.line, h.detector) for h in whole]
        elif f.suffix in TEXT_SUFFIXES:
            text_files.append((f, name))
        else:
            stats["skipped_binary"] += 1  # no text to leak through a report
    # Batches of 512 lines are planned up front (the executor shards a plan): an artifact set is small next
    # to the traces, and a line is kept only as bytes.
    for found in Executor(workers).map(_work, list(_batches(text_files, stats)), (redactor, canaries)):
        hits += found
    hits = sorted(set(hits))
    by_det = Counter(h.detector for h in hits)
    return {"files": len(text_files) + stats["safetensors_headers"] + stats["json_files"], "skipped_binary": stats["skipped_binary"],
            "lines": stats["lines"], "bytes": stats["bytes"], "hits": [h.__dict__ for h in hits],
            "by_detector": dict(sorted(by_det.items()))}


def report(scan: dict, params: LeaksParams, canaries: Canaries, scanned: list[str]) -> dict:
    """leak_report.json: counts always complete, the hit list capped; `ok` ignores only ignore_detectors."""
    hits = scan["hits"]
    failing = [h for h in hits if h["detector"] not in params.ignore_detectors]
    by_file = Counter(h["file"] for h in hits)
    return {
        "ok": not failing,
        "hits_total": len(hits),
        "hits_failing": len(failing),
        "hits": hits[: params.max_hits_listed],
        "hits_listed": min(len(hits), params.max_hits_listed),
        "by_detector": scan["by_detector"],
        "by_file": dict(sorted(by_file.items())),
        "files_scanned": scan["files"],
        "skipped_binary": scan["skipped_binary"],
        "lines_scanned": scan["lines"],
        "bytes_scanned": scan["bytes"],
        "scanned": sorted(scanned),
        "canaries": {"plain": len(canaries.plain), "sha256": len(canaries.hashes)},
        "ignored_detectors": sorted(params.ignore_detectors),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.leaks", description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--out", required=True, type=Path, help="folder for leak_report.json")
    ap.add_argument("--scan", required=True, nargs="+", type=Path, help="artifact files and folders")
    a = ap.parse_args(argv)
    params = load_params(a.params, "leaks", LeaksParams)
    rp = load_params(a.params, "redact", RedactParams)
    unknown = sorted(set(params.ignore_detectors) - set(DETECTORS))
    if unknown or "canary" in params.ignore_detectors:
        raise SystemExit(f"{a.params}: leaks.ignore_detectors: unknown or not ignorable: {', '.join(unknown or ['canary'])}")
    missing = [str(p) for p in a.scan if not p.exists()]
    if missing:  # a missing artifact is not a clean one
        raise SystemExit(f"leaks: nothing to scan at {', '.join(missing)}")
    canaries = Canaries(rp.canaries, rp.canary_sha256)
    scan = scan_paths(a.scan, redactor_from(rp), canaries, root=Path.cwd(), workers=worker_count(params.workers))
    rep = report(scan, params, canaries, [(p.resolve().relative_to(Path.cwd().resolve())
                                           if p.resolve().is_relative_to(Path.cwd().resolve()) else p).as_posix()
                                          for p in a.scan])
    write_json(a.out / "leak_report.json", LeakReport.model_validate(rep).model_dump(mode="json"))
    dets = ", ".join(f"{d} {n}" for d, n in rep["by_detector"].items()) or "none"
    print(f"leaks: {rep['files_scanned']} files, {rep['lines_scanned']} lines scanned; {rep['hits_total']} hits "
          f"({dets}) -> {'ok' if rep['ok'] else 'BLOCK'}; {a.out}/leak_report.json")


if __name__ == "__main__":
    main()
