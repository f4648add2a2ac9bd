"""The labelled redaction fixture: tests/fixtures/redaction/labelled.jsonl, assembled from two data files.

    python -m bench.redaction_cases [--out tests/fixtures/redaction/labelled.jsonl] [--check]

- tests/fixtures/redaction/cases.jsonl: the hand-written cases, one a line, in the labelled shape below
  (edit it directly: a new case goes at the end of its category's run, with the next id).
- tests/fixtures/redaction/families.jsonl: one seed a line (a value, the prose and the JSON it sits in),
  expanded here into every placement a trace has (LOCATIONS); ids continue each category's numbering.

One case a line, ids stable, keys sorted:

    {"id": "email-tp-01", "category": "email", "kind": "tp", "location": "message",
     "text": "...", "labels": [{"category": "email", "value": "jane.doe@example.com"}], "note": "..."}

- category: a detector name from stages/detectors.py (DETECTORS), or "benign_code" for the group of
  code-like text that must stay untouched.
- kind: "tp" (has labels), "fp" (a benign look-alike for that detector: no labels) or "benign".
- location: "message" (a chat message's content), "tool_args" (a tool call's arguments, as the JSON
  text the agent sent) or "review_note" (the human review's notes).
- labels: the exact substrings that MUST be redacted, each with the detector family it belongs to.
  For tool_args a value is a substring of one of the decoded JSON strings (a key or a value).
  Labels are the truth, not what the detectors happen to do: a case a detector gets wrong stays,
  with its true label, and shows up in metrics/redaction_quality.json.

Every value is fake: AWS's documented example keys, Luhn-valid test card numbers, example.com /
example.org addresses, documentation-range-free public resolver IPs, random bodies (drawn once from a
seeded generator when the cases were first written). In the written JSONL the second character of each vendor prefix (gh*_, xox*-, sk_live_, ...)
is written as a JSON \\u escape so that secret scanners and push protection do not flag the fixture;
`json.loads` gives the real text back.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "redaction"
DEFAULT_OUT = FIXTURES / "labelled.jsonl"
CASES = FIXTURES / "cases.jsonl"
FAMILIES = FIXTURES / "families.jsonl"
LOCATIONS = ("message", "assistant", "system", "tool_args", "tool_args_nested", "tool_result", "tool_result_json",
             "tool_result_double", "tool_schema", "metadata", "dict_key", "review_note")
# What the JSONL shields: the second char of each becomes a \u escape. Spelt in pieces so that this file itself
# is not flagged either.
SHIELD = ("dap" + "i", "do" + "p_v1_", "shp" + "at_", "hv" + "s.", "ya" + "29.", "HR" + "KU-", "EA" + "AA",
          "dis" + "cord.com/api/webhooks", "gh" + "p_", "gh" + "o_", "github" + "_pat_", "glp" + "at-", "gld" + "t-",
          "xo" + "xb-", "xo" + "xp-", "xa" + "pp-", "xo" + "xo-", "sk" + "_live_", "sk" + "_test_", "rk" + "_live_",
          "wh" + "sec_", "sk" + "-ant-", "sk" + "-proj-", "h" + "f_", "AI" + "za", "AK" + "C", "S" + "G.", "sq0" + "csp-",
          "pypi" + "-AgE", "npm" + "_", "hooks.slack" + ".com/", "AKIA", "ASIA", "-----BEGIN ", "Account" + "Key=",
          "_auth" + "Token=")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fill(obj, v: str):
    if isinstance(obj, str):
        return obj.replace("{v}", v)
    if isinstance(obj, dict):
        return {_fill(k, v): _fill(x, v) for k, x in obj.items()}
    if isinstance(obj, list):
        return [_fill(x, v) for x in obj]
    return obj


def placements(seed: dict) -> dict[str, str]:
    """location -> the case text for one seed of families.jsonl."""
    v = seed["value"] or ""
    prose = seed["prose"].replace("{v}", v)
    obj = _fill(seed["args"], v) if seed["args"] is not None else {"text": prose}
    dump = lambda o: json.dumps(o, ensure_ascii=False)  # noqa: E731
    if seed["schema"]:
        schema = {"type": "object", "properties": {k: {"type": "string", "default": x}
                                                   for k, x in _fill(seed["schema"], v).items()}}
    else:
        schema = {"type": "object", "properties": {"input": {"type": "string", "description": prose}}}
    return {
        "message": prose, "assistant": prose, "system": prose, "review_note": prose, "tool_result": prose,
        "tool_args": dump(obj), "tool_args_nested": dump({"request": {"steps": [obj], "retries": 1}}),
        "tool_result_json": dump(obj), "tool_result_double": dump(dump(obj)), "tool_schema": dump(schema),
        "metadata": dump(obj), "dict_key": dump({prose: "seen"}),
    }


def build() -> list[dict]:
    """The hand-written cases, then every family seed in every placement, ids numbered per (category, kind)."""
    cases = _jsonl(CASES)
    counters = Counter((c["category"], c["kind"]) for c in cases)
    for seed in _jsonl(FAMILIES):
        cat, kind = seed["category"], seed["kind"]
        for loc, text in placements(seed).items():
            counters[(cat, kind)] += 1
            labels = [{"category": cat, "value": seed["value"]}] if kind == "tp" else []
            cases.append({"id": f"{cat}-{kind}-{counters[(cat, kind)]:02d}", "category": cat, "kind": kind,
                          "location": loc, "text": text, "labels": labels, "note": seed["note"] or f"placement: {loc}"})
    for c in cases:
        assert c["location"] in LOCATIONS and (c["kind"] == "tp") == bool(c["labels"]), c["id"]
    ids = [c["id"] for c in cases]
    assert len(set(ids)) == len(ids), "case ids must be unique"
    return cases


def shield(line: str) -> str:
    """Write the second char of each vendor prefix as a JSON \\u escape (same text once decoded)."""
    for p in SHIELD:
        line = line.replace(p, p[0] + f"\\u{ord(p[1]):04x}" + p[2:])
    return line


def render(cases: list[dict]) -> str:
    lines = []
    for c in cases:
        line = shield(json.dumps(c, sort_keys=True, ensure_ascii=False))
        assert json.loads(line) == c, c["id"]
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="exit 1 if --out differs from what this script writes")
    a = ap.parse_args(argv)
    text = render(build())
    if a.check:
        same = a.out.exists() and a.out.read_text(encoding="utf-8") == text
        print(f"{a.out}: {'up to date' if same else 'out of date; run python -m bench.redaction_cases'}")
        return 0 if same else 1
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines())} cases to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
