"""The naive pass: how a straightforward build script does the same job (the openclaw protocol's does it this way).

    python -m bench.naive --raw RAW --out DIR

Stdlib `json`; every line is loaded and kept in memory; every string value goes through ~25
typical PII/secret regexes one after another with `re.sub` (stages.detectors exposes no flat
pattern list, because it does not work that way, so the usual scanner patterns are written out
here); exact dedup by sha256 of the canonical JSON; a seeded shuffle into train/val; json.dumps out.
It is a reference for the cost of the obvious approach, not a redactor to trust.
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

# name -> pattern: the usual suspects of secret scanners and PII scrubbers.
PATTERNS: list[tuple[str, re.Pattern]] = [(name, re.compile(rx)) for name, rx in (
    ("PRIVATE_KEY", r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    ("JWT", r"\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
    ("URL_CREDENTIALS", r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]+:[^\s@/]+@"),
    ("EMAIL", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    ("AWS_KEY", r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b"),
    ("AWS_SECRET", r"(?i)aws(.{0,20})?(?:secret|key)[\"'\s:=]+[A-Za-z0-9/+=]{40}"),
    ("GITHUB_TOKEN", r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    ("GITHUB_PAT", r"\bgithub_pat_[A-Za-z0-9_]{22,}\b"),
    ("GITLAB_TOKEN", r"\bglpat-[A-Za-z0-9_-]{20,}\b"),
    ("SLACK_TOKEN", r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),
    ("SLACK_WEBHOOK", r"https://hooks\.slack\.com/services/[A-Za-z0-9/]+"),
    ("STRIPE_KEY", r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}\b"),
    ("ANTHROPIC_KEY", r"\bsk-ant-[A-Za-z0-9_-]{20,}\b"),
    ("OPENAI_KEY", r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}\b"),
    ("HF_TOKEN", r"\bhf_[A-Za-z0-9]{30,}\b"),
    ("GOOGLE_API_KEY", r"\bAIza[0-9A-Za-z_-]{35}\b"),
    ("BEARER", r"(?i)bearer\s+[A-Za-z0-9\-._~+/]+=*"),
    ("SECRET_ASSIGNMENT", r"(?i)(?:password|passwd|pwd|secret|token|api[_-]?key)\s*[:=]\s*[\"']?[^\s\"',;]+"),
    ("CREDIT_CARD", r"\b(?:\d[ -]?){13,19}\b"),
    ("IBAN", r"\b[A-Z]{2}\d{2}[A-Z0-9]{11,30}\b"),
    ("SSN", r"\b\d{3}-\d{2}-\d{4}\b"),
    ("PHONE_US", r"(?:\+?1[ .-]?)?\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}\b"),
    ("PHONE_INTL", r"\+\d{1,3}[ .-]?\d{1,4}[ .-]?\d{3,4}[ .-]?\d{3,4}\b"),
    ("IPV4", r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
    ("IPV6", r"\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b"),
    ("HOME_PATH", r"/(?:home|Users)/[^/\s]+"),
)]


def scrub(text: str) -> str:
    for name, rx in PATTERNS:
        text = rx.sub(f"[{name}]", text)
    return text


def walk(obj: Any) -> Any:
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, dict):
        return {k: walk(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [walk(v) for v in obj]
    return obj


def run(raw: Path, out: Path, seed: int = 0, val_ratio: float = 0.1) -> dict[str, int]:
    records, bad, nbytes = [], 0, 0
    for path in sorted(raw.rglob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                nbytes += len(line.encode("utf-8"))
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
                else:
                    bad += 1
    redacted = [walk(r) for r in records]
    seen, unique = set(), []
    for r in redacted:
        body = {k: v for k, v in r.items() if k not in ("id", "created_at")}
        h = hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()
        if h not in seen:
            seen.add(h)
            unique.append(r)
    random.Random(seed).shuffle(unique)
    n_val = int(len(unique) * val_ratio)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("val", unique[:n_val]), ("train", unique[n_val:])):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"lines": len(records) + bad, "bytes": nbytes, "invalid": bad, "unique": len(unique),
            "train": len(unique) - n_val, "val": n_val}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sys.stdout.write(json.dumps(run(args.raw, args.out)) + "\n")


if __name__ == "__main__":
    main()
