"""ingest: add a folder's JSONL files (searched recursively) to the snapshot under content-derived names.

Not a DVC stage: it is the daily loop's entry point, run before `dvc add data/raw` and `dvc repro`.
The same bytes ingested twice add nothing; a file is never overwritten. Each file's format is detected and
reported (Claude Code sessions, Codex rollouts, OpenAI/Anthropic/ShareGPT/Hermes rows...); a file in which
no line is a trace we can read (Claude Code's history.jsonl, say) is skipped and named, never copied blind.
`make ingest SRC=~/.claude/projects` takes every session and subagent file under it.
"""
from __future__ import annotations

import argparse
import shutil
from collections import Counter
from pathlib import Path

import xxhash

from schemas.records import BUCKETS
from stages.core import atomic_open, safe_name
from stages.readers import describe_file


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def ingest(src: Path, kind: str, raw: Path) -> tuple[list[str], list[str]]:
    """Returns (added, skipped): "snapshot-relative path (format)" / "source path (why)"."""
    if kind not in BUCKETS:
        raise SystemExit(f"ingest: KIND must be one of {sorted(BUCKETS)}, got {kind!r}")
    if not src.is_dir():
        raise SystemExit(f"ingest: {src} is not a folder")
    dest = raw / kind
    dest.mkdir(parents=True, exist_ok=True)
    known = {p.stem.rsplit("-", 1)[-1] for p in dest.glob("*.jsonl")}
    added, skipped = [], []
    for path in sorted(src.rglob("*.jsonl")):
        shown = path.relative_to(src).as_posix()
        if not path.is_file() or path.is_symlink():
            skipped.append(f"{shown} (not a regular file)")
            continue
        digest = file_hash(path)
        if digest in known:
            skipped.append(f"{shown} (already in the snapshot)")
            continue
        fmt = describe_file(path)
        if fmt == "unknown":
            skipped.append(f"{shown} (no line in its first 50 is a trace format we read)")
            continue
        name = f"{safe_name(path.stem)[:48]}-{digest}.jsonl"
        with open(path, "rb") as fin, atomic_open(dest / name) as fout:
            shutil.copyfileobj(fin, fout)
        known.add(digest)
        added.append(f"{kind}/{name} ({fmt}, from {shown})")
    return added, skipped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, type=Path)
    ap.add_argument("--kind", required=True)
    ap.add_argument("--raw", required=True, type=Path)
    args = ap.parse_args(argv)
    added, skipped = ingest(args.src, args.kind, args.raw)
    for a in added:
        print(f"added   {a}")
    for s in skipped:
        print(f"skipped {s}")
    formats = Counter(a.rsplit(" (", 1)[1].split(",", 1)[0] for a in added)
    found = ", ".join(f"{n} {f}" for f, n in sorted(formats.items()))
    print(f"ingest: {len(added)} file(s) added{f' ({found})' if found else ''}, {len(skipped)} skipped; "
          "run `dvc repro` next")


if __name__ == "__main__":
    main()
