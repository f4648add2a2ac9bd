"""Redaction quality on the labelled fixture: precision, recall and F2 per detector family.

    python -m bench.redaction --cases tests/fixtures/redaction/labelled.jsonl --out metrics/redaction_quality.json
    (or `make bench-redaction`)

Each case (see bench/redaction_cases.py) is put where it would sit in a normalised trace (a
message's content, a tool call's arguments, the review notes) and redacted the way the `redact`
stage does it: the stage's own helpers (stages.redact: arguments parsed, every string collected,
one `redact_many` per trace, arguments re-serialised) and a Redactor built from params.yaml's
`redact` section, as stages/redact.py builds it. The result is checked against `redact_fields`.

Scoring, at the span level:
- A labelled secret is caught (TP) when no redacted string still contains it AND every place it
  was is covered by a placeholder of its family's kind (`<EMAIL_n>` for email, any of
  PASSWORD/API_KEY/TOKEN/SECRET for secret_assignment, ...). Otherwise it is a FN: `leaked` when
  the value is still there, `kind_mismatch` when it went under another family's placeholder.
- Every placeholder the redaction introduced is mapped back to the original span it replaced. A
  span that overlaps no label of its case is a FP, charged to the detector that found it (from
  `Redactor.scan`; the placeholder kind when a rescan found it).
- Per family: precision, recall, F2 (beta = 2: recall counts four times as much as precision);
  micro totals over all families; and for cases without labels (fp vectors, benign code-like
  text) how many came out changed.
- Checks: redacted tool-call arguments parse as JSON; redacting the output again changes nothing.

The metrics file is deterministic (sorted keys, no timestamps, rounded floats) so that
`dvc metrics diff` shows what a detector change did.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from schemas.params import RedactParams
from stages.core import load_params
from stages import detectors
from stages.detectors import DETECTORS, PLACEHOLDER_RE, PRIORITY, Placeholders, Redactor
from stages.readers import arguments_as_values, normalize, normalize_arguments
from stages.redact import redact_fields
from stages.scanning import strings_into

ROOT = Path(__file__).resolve().parents[1]
# Every place a trace holds a string: user and assistant text, the system prompt, tool-call arguments
# (flat, or nested in objects and lists), tool results (plain text, JSON text, double-encoded JSON
# text), tool schemas, metadata values and metadata keys, and the human review's notes.
LOCATIONS = ("message", "assistant", "system", "tool_args", "tool_args_nested", "tool_result", "tool_result_json",
             "tool_result_double", "tool_schema", "metadata", "dict_key", "review_note")
_JSON_LOCATIONS = ("tool_args", "tool_args_nested", "tool_schema", "metadata", "dict_key")
_ARG_LOCATIONS = ("tool_args", "tool_args_nested")
_RESULT_LOCATIONS = ("tool_result", "tool_result_json", "tool_result_double")
KINDS = ("tp", "fp", "benign")
BENIGN_GROUP = "benign_code"
BETA = 2.0

# detector family -> placeholder kinds that count as the right type
FAMILY: dict[str, frozenset[str]] = {det: frozenset({kind}) for det, kind in detectors.KINDS.items()}
FAMILY["secret_assignment"] = frozenset({"PASSWORD", "API_KEY", "TOKEN", "SECRET"})
# a finding in decoded text takes the kind of what it found there (a base64 password is a PASSWORD)
FAMILY["encoded"] = frozenset(detectors.KINDS.values())
# placeholder kind -> the first (highest-priority) detector that emits it: attribution of a span
# that `scan` of the original did not report (found by a rescan after a neighbour was replaced)
_KIND_DET: dict[str, str] = {}
for _det in DETECTORS:
    for _kind in FAMILY[_det]:
        _KIND_DET.setdefault(_kind, _det)


class FixtureError(ValueError):
    pass


# --------------------------------------------------------------------------- loading


def surface(location: str, text: str) -> list[str]:
    """The strings of a case as the redactor sees them: one text, or every string of its JSON
    (tool-call arguments, a tool schema, a metadata object)."""
    if location in _JSON_LOCATIONS:
        out: list[str] = []
        strings_into(json.loads(normalize_arguments(text)) if location in _ARG_LOCATIONS else json.loads(text), out)
        return out
    return [text]


def load_cases(path: str | Path) -> list[dict]:
    """Read and validate the fixture: known categories, kinds and locations; labels present in the text."""
    cases, seen = [], set()
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        c = json.loads(line)
        where = f"{path}:{n} ({c.get('id')})"
        if c["id"] in seen:
            raise FixtureError(f"{where}: duplicate id")
        seen.add(c["id"])
        if c["category"] not in DETECTORS and c["category"] != BENIGN_GROUP:
            raise FixtureError(f"{where}: unknown category {c['category']!r}")
        if c["kind"] not in KINDS or c["location"] not in LOCATIONS:
            raise FixtureError(f"{where}: bad kind or location")
        if (c["kind"] == "tp") != bool(c["labels"]):
            raise FixtureError(f"{where}: tp cases and only they have labels")
        strings = surface(c["location"], c["text"])
        for lab in c["labels"]:
            if lab["category"] not in DETECTORS:
                raise FixtureError(f"{where}: unknown label category {lab['category']!r}")
            if not any(lab["value"] in s for s in strings):
                raise FixtureError(f"{where}: label {lab['value'][:12]!r}... is not in the text")
        cases.append(c)
    return cases


NAME_FAMILIES = ("person_name", "street_address")  # found only with params redact.names


def make_redactor(params_path: str | Path = ROOT / "params.yaml", disabled: Iterable[str] = (),
                  names: bool | None = None) -> Redactor:
    """The Redactor the `redact` stage builds from params.yaml (plus extra disabled detectors, for
    experiments; `names` overrides redact.names)."""
    p = load_params(params_path, "redact", RedactParams)
    if names is not None:
        p = p.model_copy(update={"names": names})
    return Redactor(ip_public_only=p.ip_public_only, entropy_threshold=p.entropy_threshold,
                    entropy_min_len=p.entropy_min_len, disabled=frozenset(p.disabled_detectors) | frozenset(disabled),
                    keep_documentation_emails=p.keep_documentation_emails, names=p.names)


# --------------------------------------------------------------------------- redaction like the stage


_ASK = "Please help with the ticket."


def _record(location: str, text: str) -> dict[str, Any]:
    """A raw OpenAI-style trace line (system, user, a tool call, its result, a final answer, a tool
    schema, metadata, a review) with the case's text in its place and plain text everywhere else."""
    def put(loc, default):
        return text if location == loc or (isinstance(loc, tuple) and location in loc) else default

    call = {"id": "call_1", "type": "function", "function": {"name": "tool", "arguments": put(_ARG_LOCATIONS, '{"query": "status"}')}}
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": put("system", "You are the support agent.")},
        {"role": "user", "content": put("message", _ASK)},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": put(_RESULT_LOCATIONS, "ok")},
        {"role": "assistant", "content": put("assistant", "Done.")},
    ]
    params = json.loads(text) if location == "tool_schema" else {"type": "object", "properties": {"query": {"type": "string"}}}
    rec: dict[str, Any] = {"messages": msgs, "tools": [{"type": "function", "function": {"name": "tool", "parameters": params}}],
                           "human_review": {"status": "accepted"}}
    if location == "review_note":
        rec["human_review"]["review_notes"] = text
    if location in ("metadata", "dict_key"):
        rec["metadata"] = json.loads(text)
    return rec


def _fields(location: str, text: str) -> dict[str, Any]:
    """The record as the `redact` stage holds it before redaction: read by stages.readers.normalize."""
    fields = normalize(_record(location, text))
    fields.pop("source_id")  # Worker.trace takes it out before redact_fields
    return fields


def _target(location: str, fields: dict[str, Any]) -> Any:
    if location == "review_note":
        return fields["review"]["notes"]
    if location in _ARG_LOCATIONS:
        return fields["messages"][2]["tool_calls"][0]["function"]["arguments"]
    if location == "tool_schema":
        return fields["tools"][0]["function"]["parameters"]
    if location in ("metadata", "dict_key"):
        return fields["extra"]["metadata"]
    at = {"system": 0, "message": 1, "assistant": 4}.get(location, 3)
    return fields["messages"][at]["content"]


def _target_text(location: str, fields: dict[str, Any]) -> str:
    t = _target(location, fields)
    return t if isinstance(t, str) else json.dumps(t, ensure_ascii=False)


def _slice(texts: list[str], sub: list[str]) -> int:
    """Where the case's strings sit in the trace's walk order (exactly one place)."""
    k = len(sub)
    at = [i for i in range(len(texts) - k + 1) if texts[i : i + k] == sub]
    if len(at) != 1:
        raise RuntimeError(f"the case's strings sit in {len(at)} places of the record")
    return at[0]


def redact_text(location: str, text: str, redactor: Redactor) -> tuple[list[str], list[str], str]:
    """(original strings, redacted strings, output field text) for one case, redacted by the stage's own
    `redact_fields`; the case's strings are paired by walking the record before and after (redaction
    replaces strings, never adds or removes one, so the walks line up)."""
    fields = _fields(location, text)
    arguments_as_values(fields["messages"])
    texts: list[str] = []
    strings_into(fields, texts)
    sub: list[str] = []
    strings_into(_target(location, fields), sub)
    i = _slice(texts, sub)
    ref, _ = redact_fields(_fields(location, text), redactor)
    walked = orjson.loads(orjson.dumps(ref))
    arguments_as_values(walked["messages"])
    red: list[str] = []
    strings_into(walked, red)
    if len(red) != len(texts):
        raise RuntimeError("redact_fields changed the number of strings in a record")
    return texts[i : i + len(sub)], red[i : i + len(sub)], _target_text(location, ref)


def recover_spans(orig: str, red: str) -> list[tuple[int, int, str]] | None:
    """(start, end, kind) in `orig` of every placeholder that redaction put into `red`; None if they can't be aligned."""
    had = {m.group() for m in PLACEHOLDER_RE.finditer(orig)}
    new = [m for m in PLACEHOLDER_RE.finditer(red) if m.group() not in had]
    if not new:
        return [] if orig == red else None
    parts, pos = [], 0
    for i, m in enumerate(new):
        parts.append(re.escape(red[pos : m.start()]))
        parts.append(f"(?P<g{i}>.+?)")
        pos = m.end()
    parts.append(re.escape(red[pos:]))
    mm = re.fullmatch("".join(parts), orig, re.S)
    if mm is None:
        return None
    return [(mm.start(f"g{i}"), mm.end(f"g{i}"), m.group(1)) for i, m in enumerate(new)]


def _occurrences(strings: list[str], value: str) -> list[tuple[int, int, int]]:
    out = []
    for i, s in enumerate(strings):
        j = s.find(value)
        while j >= 0:
            out.append((i, j, j + len(value)))
            j = s.find(value, j + 1)
    return out


def evaluate_case(case: dict, redactor: Redactor) -> dict[str, Any]:
    """Redact one case and score it: per label caught/leaked/kind, per introduced span FP or not."""
    loc = case["location"]
    orig, red, output = redact_text(loc, case["text"], redactor)
    spans, aligned = [], True
    for i, (o, r) in enumerate(zip(orig, red)):
        found = recover_spans(o, r)
        if found is None:  # not expected; count it, and treat the whole string as one span
            aligned, found = False, ([(0, len(o), "?")] if o != r else [])
        scan = redactor.scan(o) if found else []
        for s, e, kind in found:
            over = [f.detector for f in scan if f.start < e and s < f.end]
            det = min(over, key=PRIORITY.__getitem__) if over else _KIND_DET.get(kind, "?")
            spans.append({"string": i, "start": s, "end": e, "kind": kind, "detector": det, "text": o[s:e]})
    label_occ = []
    labels = []
    for lab in case["labels"]:
        occ = _occurrences(orig, lab["value"])
        label_occ += occ
        leaked = any(lab["value"] in r for r in red)
        kinds = sorted({sp["kind"] for (i, s, e) in occ for sp in spans if sp["string"] == i and sp["start"] < e and s < sp["end"]})
        kind_ok = all(
            any(sp["string"] == i and sp["start"] < e and s < sp["end"] and sp["kind"] in FAMILY[lab["category"]] for sp in spans)
            for (i, s, e) in occ
        ) or not aligned
        labels.append({"category": lab["category"], "value": lab["value"], "leaked": leaked,
                       "kind_ok": kind_ok, "caught": not leaked and kind_ok, "kinds": kinds})
    for sp in spans:
        sp["fp"] = not any(i == sp["string"] and s < sp["end"] and sp["start"] < e for (i, s, e) in label_occ)
    valid_json = None
    if loc in _JSON_LOCATIONS:
        try:
            json.loads(output)
            valid_json = True
        except ValueError:
            valid_json = False
    again = redact_text(loc, output, redactor)[2] if valid_json is not False else output
    return {
        "id": case["id"], "category": case["category"], "kind": case["kind"], "location": loc,
        "changed": orig != red, "labels": labels, "spans": spans, "aligned": aligned,
        "valid_json": valid_json, "idempotent": again == output, "output": output,
    }


def evaluate(cases: list[dict], redactor: Redactor) -> list[dict[str, Any]]:
    return [evaluate_case(c, redactor) for c in cases]


# --------------------------------------------------------------------------- metrics


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _scores(tp: int, fp: int, fn: int) -> dict[str, Any]:
    p, r = (tp / (tp + fp) if tp + fp else None), (tp / (tp + fn) if tp + fn else None)
    f2 = None
    if p is not None and r is not None:
        f2 = (1 + BETA**2) * p * r / (BETA**2 * p + r) if p + r else 0.0
    rnd = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {"tp": tp, "fp": fp, "fn": fn, "precision": rnd(p), "recall": rnd(r), "f2": rnd(f2)}


def aggregate(results: list[dict[str, Any]], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Per-family and micro scores, benign counts, checks, and the ids of every miss and false positive.
    Families in `exclude` keep their own row but stay out of the micro and per-location totals."""
    exclude = frozenset(exclude)
    cats = sorted(set(DETECTORS) | {r["category"] for r in results} - {BENIGN_GROUP}, key=lambda c: PRIORITY.get(c, 99))
    c = {k: Counter() for k in cats}
    for r in results:
        if r["category"] in c:
            c[r["category"]][f"{r['kind']}_cases"] += 1
            if r["kind"] == "fp" and r["changed"]:
                c[r["category"]]["fp_cases_changed"] += 1
        for lab in r["labels"]:
            cc = c.setdefault(lab["category"], Counter())
            cc["tp" if lab["caught"] else "fn"] += 1
            cc["leaked"] += lab["leaked"]
            cc["kind_mismatch"] += not lab["leaked"] and not lab["kind_ok"]
        for sp in r["spans"]:
            if sp["fp"]:
                c.setdefault(sp["detector"], Counter())["fp"] += 1
    categories = {}
    for k, cc in c.items():
        row = _scores(cc["tp"], cc["fp"], cc["fn"])
        row.update(tp_cases=cc["tp_cases"], fp_cases=cc["fp_cases"], fp_cases_changed=cc["fp_cases_changed"],
                   leaked=cc["leaked"], kind_mismatch=cc["kind_mismatch"])
        categories[k] = row
    tot = Counter()
    for k, row in categories.items():
        if k in exclude:
            continue
        for f in ("tp", "fp", "fn", "leaked", "kind_mismatch"):
            tot[f] += row[f]
    micro = _scores(tot["tp"], tot["fp"], tot["fn"])
    labels = tot["tp"] + tot["fn"]
    micro.update(labels=labels, leaked=tot["leaked"], kind_mismatch=tot["kind_mismatch"],
                 removal_recall=_ratio(labels - tot["leaked"], labels))

    def group(pred) -> dict[str, int]:
        rs = [r for r in results if pred(r)]
        return {"cases": len(rs), "changed": sum(r["changed"] for r in rs)}

    by_loc = {}
    for loc in LOCATIONS:
        rs = [r for r in results if r["location"] == loc]
        labs = [lab for r in rs for lab in r["labels"] if lab["category"] not in exclude]
        s = _scores(sum(lab["caught"] for lab in labs), sum(sp["fp"] for r in rs for sp in r["spans"]),
                    sum(not lab["caught"] for lab in labs))
        s["cases"] = len(rs)
        by_loc[loc] = s
    # recall of each family in each placement: "caught/labels"
    cell: dict[str, Counter] = {}
    for r in results:
        for lab in r["labels"]:
            cc = cell.setdefault(lab["category"], Counter())
            cc[(r["location"], "n")] += 1
            cc[(r["location"], "caught")] += lab["caught"]
    by_family_location = {fam: {loc: f"{cc[(loc, 'caught')]}/{cc[(loc, 'n')]}" for loc in LOCATIONS if cc[(loc, "n")]}
                          for fam, cc in sorted(cell.items(), key=lambda kv: PRIORITY.get(kv[0], 99))}
    ids = lambda pred: sorted(r["id"] for r in results if pred(r))  # noqa: E731
    return {
        "cases": {"total": len(results), **{k: sum(r["kind"] == k for r in results) for k in KINDS}},
        "categories": categories,
        "micro": micro,
        "by_location": by_loc,
        "by_family_location": by_family_location,
        "benign_code": group(lambda r: r["category"] == BENIGN_GROUP),
        "fp_vectors": group(lambda r: r["kind"] == "fp"),
        "checks": {
            "invalid_json": sum(r["valid_json"] is False for r in results),
            "not_idempotent": sum(not r["idempotent"] for r in results),
            "unaligned": sum(not r["aligned"] for r in results),
        },
        "defects": {
            "missed": ids(lambda r: any(not lab["caught"] for lab in r["labels"])),
            "false_positive": ids(lambda r: any(sp["fp"] for sp in r["spans"])),
            "benign_changed": ids(lambda r: r["kind"] != "tp" and r["changed"]),
        },
    }


def measure(cases: list[dict], params: str | Path = ROOT / "params.yaml",
            disable: Iterable[str] = ()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-case results, metrics) with the params' redactor; plus, when params leave redact.names
    off, what turning it on would do (`with_names`)."""
    redactor = make_redactor(params, disable)
    results = evaluate(cases, redactor)
    metrics = aggregate(results, exclude=() if redactor.names else NAME_FAMILIES)
    metrics["names_param"] = redactor.names
    metrics["excluded_from_totals"] = [] if redactor.names else list(NAME_FAMILIES)
    if not redactor.names:
        metrics["with_names"] = names_summary(evaluate(cases, make_redactor(params, disable, names=True)))
    return results, metrics


def names_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What `redact.names: true` would do on the fixture: the name families' scores, and what it
    costs elsewhere (false positives, benign and look-alike cases changed)."""
    m = aggregate(results)
    return {"categories": {k: m["categories"][k] for k in NAME_FAMILIES if k in m["categories"]},
            "micro": m["micro"], "benign_code": m["benign_code"], "fp_vectors": m["fp_vectors"],
            "false_positive_ids": m["defects"]["false_positive"]}


def dumps(metrics: dict[str, Any]) -> str:
    return json.dumps(metrics, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def table(metrics: dict[str, Any]) -> str:
    fmt = lambda x: "   -" if x is None else f"{x:.2f}"  # noqa: E731
    head = f"{'family':<22}{'cases':>7}{'fpvec':>6}{'TP':>5}{'FN':>5}{'FP':>5}{'leak':>6}  {'P':>5} {'R':>5} {'F2':>5}"
    lines = [head, "-" * len(head)]
    rows = list(metrics["categories"].items()) + [("micro", {**metrics["micro"], "tp_cases": metrics["cases"]["tp"],
                                                            "fp_cases": metrics["cases"]["fp"]})]
    for name, r in rows:
        if name == "micro":
            lines.append("-" * len(head))
        lines.append(f"{name:<22}{r['tp_cases']:>7}{r['fp_cases']:>6}{r['tp']:>5}{r['fn']:>5}{r['fp']:>5}{r['leaked']:>6}"
                     f"  {fmt(r['precision']):>5} {fmt(r['recall']):>5} {fmt(r['f2']):>5}")
    b, v, ch = metrics["benign_code"], metrics["fp_vectors"], metrics["checks"]
    lines.append(f"benign code-like cases changed: {b['changed']}/{b['cases']}; fp-vector cases changed: {v['changed']}/{v['cases']}")
    lines.append("by location: " + ", ".join(
        f"{k} R={fmt(r['recall'])} P={fmt(r['precision'])}" for k, r in metrics["by_location"].items()))
    lines.append(f"checks: invalid JSON {ch['invalid_json']}, not idempotent {ch['not_idempotent']}, unaligned {ch['unaligned']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=Path, default=ROOT / "tests" / "fixtures" / "redaction" / "labelled.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "metrics" / "redaction_quality.json")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--disable", action="append", default=[], help="also disable this detector (experiments; repeatable)")
    ap.add_argument("--details", action="store_true", help="print every miss and false positive")
    a = ap.parse_args(argv)
    results, metrics = measure(load_cases(a.cases), a.params, a.disable)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(dumps(metrics), encoding="utf-8")
    print(table(metrics))
    if "with_names" in metrics:
        w = metrics["with_names"]
        print("with redact.names: true: " + ", ".join(
            f"{k} R={r['recall']} P={r['precision']}" for k, r in w["categories"].items())
              + f"; micro P={w['micro']['precision']}; benign changed {w['benign_code']['changed']}/{w['benign_code']['cases']},"
              f" look-alikes changed {w['fp_vectors']['changed']}/{w['fp_vectors']['cases']}")
    if a.details:
        for r in results:
            for lab in r["labels"]:
                if not lab["caught"]:
                    why = "leaked" if lab["leaked"] else f"kind {lab['kinds']}"
                    print(f"MISS {r['id']} [{r['location']}] {lab['category']}: {why}: {r['output'][:160]!r}")
            for sp in r["spans"]:
                if sp["fp"]:
                    print(f"FP   {r['id']} [{r['location']}] {sp['detector']} -> <{sp['kind']}>: {sp['text'][:80]!r}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
