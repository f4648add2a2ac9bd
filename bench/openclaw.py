"""The openclaw reference: what openclaw-ft's `scripts/build_protocol_dataset.py` does, written here from the facts of
its behaviour, so that `make bench` times us against the tool users would otherwise pick (not against a strawman).

    python -m bench.openclaw --raw RAW --out DIR [--target-examples 20000] [--max-per-source 0]

What it does, as the real script does it:
- every input file is read whole into memory and each line parsed with stdlib `json`; approved-runs/ and traces/
  are its "real" bucket, synthetic/ and adversarial/ the other two;
- only three shapes are understood: `messages` or `conversation` lists (entries with `role` and `content`, content
  stringified), and `user` + `assistant` strings (plus a default system turn); anything else is "malformed";
- seven regexes (email, GitHub tokens, `sk-` keys, bearer/token/api-key assignments, URLs, Unix home paths, Windows
  paths) are applied one after another with `re.subn` to every message content;
- a row whose first user turn has < 10 characters or first assistant turn < 20 is "low signal";
- exact dedup by sha256 of `json.dumps(messages, ensure_ascii=True, sort_keys=True)`;
- a seeded `random.sample` per bucket by ratio up to the target, topped up from the rest, shuffled, and the first
  `val_ratio` share is val; train/val rows are `{"source", "messages"}`, plus an indented JSON manifest.

Two deliberate differences, both in its favour or neutral: the real script stops at the first line that is not
JSON, this one counts it and goes on (the bench corpus has 0.3% malformed lines); and its per-source cap (4,000 by
default, which would discard most of a 100k corpus before any work) is off unless `--max-per-source` is given.
It is a speed reference, not a redactor to trust: it misses most secret kinds, and keeps no tool calls.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(rx), token) for rx, token in (
    (r"\b[\w.%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b", "<REDACTED_EMAIL>"),
    (r"\b(?:ghp|github_pat)_\w{20,}\b", "<REDACTED_GH_TOKEN>"),
    (r"\bsk-[A-Za-z0-9]{20,}\b", "<REDACTED_API_KEY>"),
    (r"(?i)\b(?:bearer|token|api[_-]?key)\s*[:=]\s*[\w.-]{8,}\b", "<REDACTED_SECRET>"),
    (r"https?://\S+", "<REDACTED_URL>"),
    (r"(?:/Users|/home|/root)/[^\s'\"`]+", "<REDACTED_PATH>"),
    (r"[A-Za-z]:\\(?:[^\\\s]+\\)*[^\\\s]+", "<REDACTED_PATH>"),
)]
BUCKETS = {"approved-runs": "real", "traces": "real", "synthetic": "synthetic", "adversarial": "adversarial"}
DEFAULT_SYSTEM = "You are OpenClaw assistant. Be accurate, concise, and safe."


def messages_of(row: Any) -> list[dict[str, str]]:
    if not isinstance(row, dict):
        return []
    for key in ("messages", "conversation"):
        if isinstance(row.get(key), list):
            return [{"role": str(m["role"]), "content": str(m["content"])}
                    for m in row[key] if isinstance(m, dict) and "role" in m and "content" in m]
    if isinstance(row.get("user"), str) and isinstance(row.get("assistant"), str):
        return [{"role": "system", "content": str(row.get("system", DEFAULT_SYSTEM))},
                {"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
    return []


def scrub(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    out, total = [], 0
    for m in messages:
        text = m["content"]
        for rx, token in RULES:
            text, n = rx.subn(token, text)
            total += n
        out.append({"role": m["role"], "content": text})
    return out, total


def first_len(messages: list[dict[str, str]], role: str) -> int:
    return next((len(m["content"].strip()) for m in messages if m["role"].strip().lower() == role), 0)


def load(raw: Path, stats: dict[str, int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(raw.rglob("*.jsonl")):
        bucket = BUCKETS.get(path.relative_to(raw).parts[0], "real")
        for line in path.read_text(encoding="utf-8").splitlines():  # whole file in memory, as the script does
            if not line.strip():
                continue
            stats["raw_rows"] += 1
            try:
                row = json.loads(line)
            except ValueError:
                stats["invalid_json"] += 1
                continue
            msgs = messages_of(row)
            if not msgs:
                stats["rejected_malformed"] += 1
                continue
            msgs, n = scrub(msgs)
            stats["redactions"] += n
            stats["rows_with_redactions"] += n > 0
            if first_len(msgs, "user") < 10 or first_len(msgs, "assistant") < 20:
                stats["rejected_low_signal"] += 1
                continue
            rows.append({"bucket": bucket, "source": str(row.get("source", bucket)), "messages": msgs})
    return rows


def fingerprint(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=True, sort_keys=True).encode("utf-8")).hexdigest()


def select(rows: list[dict[str, Any]], target: int, ratios: dict[str, float], max_per_source: int,
           rng: random.Random) -> tuple[list[dict[str, Any]], int]:
    per_source: dict[str, int] = {}
    capped = []
    for r in rows:
        if max_per_source and per_source.get(r["source"], 0) >= max_per_source:
            continue
        per_source[r["source"]] = per_source.get(r["source"], 0) + 1
        capped.append(r)
    seen: set[str] = set()
    deduped = []
    for r in capped:
        r["fp"] = fingerprint(r["messages"])
        if r["fp"] not in seen:
            seen.add(r["fp"])
            deduped.append(r)
    target = min(target, len(deduped))
    chosen: list[dict[str, Any]] = []
    for bucket, ratio in ratios.items():
        pool = [r for r in deduped if r["bucket"] == bucket]
        chosen += rng.sample(pool, min(max(0, round(target * ratio)), len(pool)))
    if len(chosen) < target:
        taken = {r["fp"] for r in chosen}
        rest = [r for r in deduped if r["fp"] not in taken]
        chosen += rng.sample(rest, min(target - len(chosen), len(rest)))
    rng.shuffle(chosen)
    return chosen, len(deduped)


def run(raw: Path, out: Path, target: int = 20000, val_ratio: float = 0.1, max_per_source: int = 0,
        seed: int = 42) -> dict[str, Any]:
    stats = dict.fromkeys(("raw_rows", "invalid_json", "rejected_malformed", "rejected_low_signal", "redactions",
                           "rows_with_redactions"), 0)
    rows = load(raw, stats)
    chosen, post_dedup = select(rows, target, {"real": 0.6, "synthetic": 0.3, "adversarial": 0.1}, max_per_source,
                                random.Random(seed))
    n_val = min(len(chosen), round(len(chosen) * val_ratio))
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("val.jsonl", chosen[:n_val]), ("train.jsonl", chosen[n_val:])):
        with open(out / name, "w", encoding="utf-8", newline="\n") as fh:
            for r in part:
                fh.write(json.dumps({"source": r["source"], "messages": r["messages"]}, ensure_ascii=True) + "\n")
    manifest = {"contract_version": "1.0", "build": {"selected_examples": len(chosen), "val_examples": n_val,
                                                     "train_examples": len(chosen) - n_val},
                "qc": {**stats, "post_dedup_rows": post_dedup}}
    (out / "dataset_manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return {"rows": stats["raw_rows"], "selected": len(chosen), "post_dedup": post_dedup,
            "malformed": stats["rejected_malformed"] + stats["invalid_json"], "low_signal": stats["rejected_low_signal"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target-examples", type=int, default=20000)
    ap.add_argument("--max-per-source", type=int, default=0, help="0: no cap (the real script's default is 4000)")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.raw, args.out, args.target_examples, max_per_source=args.max_per_source)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
