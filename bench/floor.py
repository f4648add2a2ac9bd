"""The floor: the least any stage that parses and rewrites every line must do.

    python -m bench.floor --raw RAW --out FILE

One process, one pass: read each line of every *.jsonl under RAW (sorted), `orjson.loads` it,
`orjson.dumps` it, write it. No validation, no redaction, no hashing. A stage's traces/s divided
by the floor's says how much of its time is its own work rather than JSON and I/O.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson


def run(raw: Path, out: Path) -> dict[str, int]:
    lines = bad = nbytes = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    loads, dumps = orjson.loads, orjson.dumps
    with open(out, "wb", buffering=1 << 20) as fo:
        for path in sorted(raw.rglob("*.jsonl")):
            with open(path, "rb", buffering=1 << 20) as fh:
                for line in fh:
                    lines += 1
                    nbytes += len(line)
                    try:
                        obj = loads(line)
                    except orjson.JSONDecodeError:
                        bad += 1
                        continue
                    fo.write(dumps(obj))
                    fo.write(b"\n")
    return {"lines": lines, "bytes": nbytes, "invalid_json": bad}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sys.stdout.buffer.write(orjson.dumps(run(args.raw, args.out)) + b"\n")


if __name__ == "__main__":
    main()
