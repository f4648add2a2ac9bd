"""Pure metric functions for eval (no torch, no I/O): per-case scores, aggregation, paired bootstrap, McNemar.

Per case and model:
- exact_match: the normalised prediction equals the normalised reference; a JSON reference also matches a
  prediction that parses to the same value (key order and spacing do not matter).
- keyword_recall: share of the case's expected_behavior items found (normalised substring) in the prediction when
  the case lists any; otherwise share of the reference's content words (normalised tokens minus stopwords) found
  among the prediction's tokens. Undefined (None) when there is nothing to recall.
- token_f1: SQuAD-style F1 over normalised tokens (multiset overlap).
- json_valid / json_field_accuracy: only when the reference is JSON: does the prediction parse; share of the
  reference's leaf fields (dotted paths) whose value the prediction reproduces.
- forbidden_violation: only when the case lists forbidden_behavior: 1 if any item occurs (normalised substring)
  in the prediction. A literal phrase check, not a judgement of intent.

Tool calls, only when the reference answer makes any (written and parsed in the one format of stages/chat.py),
scored as calls, not as text; the checks follow the Berkeley Function Calling Leaderboard's AST checker: argument
key order does not matter, an integral float equals the int (3.0 == 3), parallel calls match in any order, and a
call must name the right function before its arguments count:
- tool_call_accuracy: 1 when the predicted calls are exactly the reference calls (names and canonical arguments,
  as a multiset); the gate's tool-call metric.
- tool_name_accuracy: reference call names matched by predicted ones (multiset), over the larger of the two
  counts, so extra calls cost as missing ones do.
- tool_args_f1: F1 over (function, argument, canonical value) triples: partial credit for partly right arguments.
- tool_call_parse_rate: share of the prediction's <tool_call> blocks that parse; 0 when it wrote none (the calls
  the reference makes did not come out as calls at all), so that it is defined, and paired, on every such case.

Aggregates are means over the cases where a metric is defined; deltas are adapter - baseline on the same cases.
"""
from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from stages.chat import canonical_json, parse_tool_calls

TOOL_METRICS = ("tool_call_accuracy", "tool_name_accuracy", "tool_args_f1", "tool_call_parse_rate")
METRICS = ("exact_match", "keyword_recall", "token_f1", "json_valid", "json_field_accuracy",
           "forbidden_violation") + TOOL_METRICS
# the aggregate name of each per-case metric
AGG_NAME = {m: m for m in METRICS} | {"forbidden_violation": "forbidden_violation_rate"}

STOPWORDS = frozenset(
    """a an and are as at be been but by can could did do does for from had has have he her his i if in into is it
    its me my no not of on or our she so than that the their them then there these they this to too up us was we were
    what when which who will with would you your yours i'm it's don't can't""".split()
)

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Normalizer:
    lowercase: bool = True
    collapse_whitespace: bool = True
    strip_punctuation: bool = True

    def __call__(self, text: str) -> str:
        if self.lowercase:
            text = text.lower()
        if self.strip_punctuation:
            text = _PUNCT.sub(" ", text)
        if self.collapse_whitespace:
            text = _WS.sub(" ", text)
        return text.strip()

    def tokens(self, text: str) -> list[str]:
        return self(text).split()


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, value) when `text` is a JSON object or array (scalars do not count as structured answers)."""
    text = text.strip()
    if not text or text[0] not in "{[":
        return False, None
    try:
        value = json.loads(text)
    except ValueError:
        return False, None
    return True, value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values of a JSON value by dotted path; an empty object/array is a leaf itself."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k in sorted(value):
            out.update(flatten(value[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def exact_match(pred: str, ref: str, norm: Normalizer) -> float:
    if norm(pred) == norm(ref):
        return 1.0
    ok_ref, ref_v = parse_json(ref)
    if ok_ref:
        ok_pred, pred_v = parse_json(pred)
        return float(ok_pred and pred_v == ref_v)
    return 0.0


def token_f1(pred: str, ref: str, norm: Normalizer) -> float:
    p, r = norm.tokens(pred), norm.tokens(ref)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def content_words(text: str, norm: Normalizer, stopwords: Iterable[str]) -> list[str]:
    stop = {norm(w) for w in stopwords}
    seen: dict[str, None] = {}
    for tok in norm.tokens(text):
        if tok not in stop:
            seen.setdefault(tok)
    return list(seen)


def keyword_recall(pred: str, ref: str, norm: Normalizer, stopwords: Iterable[str] = STOPWORDS,
                   expected: Sequence[str] | None = None) -> float | None:
    if expected:
        items = [norm(e) for e in expected if norm(e)]
        if items:
            p = f" {norm(pred)} "
            return sum(f" {e} " in p for e in items) / len(items)
    words = content_words(ref, norm, stopwords)
    if not words:
        return None
    have = set(norm.tokens(pred))
    return sum(w in have for w in words) / len(words)


def json_scores(pred: str, ref: str) -> tuple[float | None, float | None]:
    """(json_valid, json_field_accuracy), both None when the reference is not JSON."""
    ok_ref, ref_v = parse_json(ref)
    if not ok_ref:
        return None, None
    ok_pred, pred_v = parse_json(pred)
    if not ok_pred:
        return 0.0, 0.0
    ref_f, pred_f = flatten(ref_v), flatten(pred_v)
    return 1.0, sum(pred_f.get(k, _MISSING) == v for k, v in ref_f.items()) / len(ref_f)


_MISSING = object()


def forbidden_violation(pred: str, forbidden: Sequence[str] | None, norm: Normalizer) -> float | None:
    items = [norm(f) for f in forbidden or () if norm(f)]
    if not items:
        return None
    p = f" {norm(pred)} "
    return float(any(f" {f} " in p for f in items))


def _plain_numbers(value: Any) -> Any:
    """BFCL's type leniency: 3.0 and 3 are the same argument (bools stay bools)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(v) for v in value]
    return value


def _call_key(call: dict) -> str:
    return canonical_json([call["name"], _plain_numbers(call["arguments"])])


def _arg_triples(calls: list[dict]) -> Counter:
    out: Counter = Counter()
    for c in calls:
        args = _plain_numbers(c["arguments"])
        if isinstance(args, dict):
            out.update((c["name"], k, canonical_json(v)) for k, v in args.items())
        else:
            out[(c["name"], "", canonical_json(args))] += 1
    return out


def _f1(pred: Counter, ref: Counter) -> float:
    if not pred and not ref:
        return 1.0
    common = sum((pred & ref).values())
    if common == 0:
        return 0.0
    p, r = common / sum(pred.values()), common / sum(ref.values())
    return 2 * p * r / (p + r)


_NO_TOOL_SCORES: dict[str, float | None] = dict.fromkeys(TOOL_METRICS)


def tool_call_scores(pred: str, ref: str) -> dict[str, float | None]:
    """The four tool-call metrics of one case; all None when the reference makes no call (not counted)."""
    ref_calls, _ = parse_tool_calls(ref)
    if not ref_calls:
        return dict(_NO_TOOL_SCORES)
    pred_calls, bad = parse_tool_calls(pred)
    names_p, names_r = Counter(c["name"] for c in pred_calls), Counter(c["name"] for c in ref_calls)
    blocks = len(pred_calls) + bad
    return {
        "tool_call_accuracy": float(Counter(map(_call_key, pred_calls)) == Counter(map(_call_key, ref_calls))),
        "tool_name_accuracy": sum((names_p & names_r).values()) / max(len(pred_calls), len(ref_calls)),
        "tool_args_f1": _f1(_arg_triples(pred_calls), _arg_triples(ref_calls)),
        "tool_call_parse_rate": len(pred_calls) / blocks if blocks else 0.0,
    }


def score_case(pred: str, ref: str, norm: Normalizer, stopwords: Iterable[str] = STOPWORDS,
               expected: Sequence[str] | None = None, forbidden: Sequence[str] | None = None) -> dict[str, float | None]:
    valid, fields = json_scores(pred, ref)
    return {
        **tool_call_scores(pred, ref),
        "exact_match": exact_match(pred, ref, norm),
        "keyword_recall": keyword_recall(pred, ref, norm, stopwords, expected),
        "token_f1": token_f1(pred, ref, norm),
        "json_valid": valid,
        "json_field_accuracy": fields,
        "forbidden_violation": forbidden_violation(pred, forbidden, norm),
    }


# ---- statistics --------------------------------------------------------------------------------------------------


def mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default 'linear' method)."""
    if not sorted_xs:
        raise ValueError("quantile of an empty sequence")
    pos = (len(sorted_xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def paired_bootstrap_ci(baseline: Sequence[float], adapter: Sequence[float], samples: int = 2000,
                        confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of mean(adapter - baseline), resampling cases (pairs) with replacement. Seeded."""
    if len(baseline) != len(adapter):
        raise ValueError("paired bootstrap needs equal-length sequences")
    n = len(baseline)
    if n == 0:
        raise ValueError("paired bootstrap of zero cases")
    diffs = [a - b for a, b in zip(adapter, baseline)]
    rng = random.Random(seed)
    stats = []
    for _ in range(samples):
        stats.append(sum(diffs[rng.randrange(n)] for _ in range(n)) / n)
    stats.sort()
    alpha = (1 - confidence) / 2
    return quantile(stats, alpha), quantile(stats, 1 - alpha)


def mcnemar_exact(baseline_only: int, adapter_only: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of the discordant pairs against p = 1/2."""
    n = baseline_only + adapter_only
    if n == 0:
        return 1.0
    k = min(baseline_only, adapter_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x + 0.0, nd)


def compare(cases: Sequence[dict], samples: int, confidence: float, seed: int) -> dict:
    """Baseline vs adapter over `cases`, each {"baseline": scores, "adapter": scores} (same case, both models).

    Returns n, counts, baseline/finetuned means, delta, paired-bootstrap CI per delta, McNemar on exact match.
    """
    out: dict[str, Any] = {"n": len(cases), "counts": {}, "baseline": {}, "finetuned": {}, "delta": {}, "ci": {}}
    for i, metric in enumerate(METRICS):
        # .get: a metric a case's scores lack (scored before it existed) is undefined there, like None
        pairs = [(c["baseline"][metric], c["adapter"][metric]) for c in cases if c["baseline"].get(metric) is not None
                 and c["adapter"].get(metric) is not None]
        name = AGG_NAME[metric]
        out["counts"][name] = len(pairs)
        b = [p[0] for p in pairs]
        a = [p[1] for p in pairs]
        out["baseline"][name] = _r(mean(b))
        out["finetuned"][name] = _r(mean(a))
        if pairs:
            out["delta"][name] = _r(mean(a) - mean(b))
            lo, hi = paired_bootstrap_ci(b, a, samples, confidence, seed + i)
            out["ci"][name] = {"low": _r(lo), "high": _r(hi)}
    b_only = sum(1 for c in cases if c["baseline"]["exact_match"] == 1 and c["adapter"]["exact_match"] != 1)
    a_only = sum(1 for c in cases if c["baseline"]["exact_match"] != 1 and c["adapter"]["exact_match"] == 1)
    out["mcnemar_exact_match"] = {"baseline_only": b_only, "adapter_only": a_only,
                                  "p_value": float(f"{mcnemar_exact(b_only, a_only):.6g}")}
    return out
