"""redact: every raw line -> a redacted canonical Trace, or a reject naming file, line and reason.

Every string of every record is scanned (a `redaction_status: passed` flag is recorded, never
trusted). Ids are replaced by keyed hashes. Runs that may not train stay in the output with
`trainable: false` and their reasons, so export can still count them.

Speed (see bench/README.md), without skipping any detector or string:
- stages/executor.py maps `redact_block` over planned blocks (`plan_work`): the workers read whole
  lines themselves (small files, one session each, grouped ~1 MB a block and sniffed by their
  worker); the parent only counts lines of large files, keeps the first trace of each id and writes
  each piece's output in one go, in block order (`_Tally`);
- a record the prefilter clears (`_cleared`: Redactor.nothing_to_find on orjson's output, ~90% of
  them) is finished on the spot; for the others, strings come from orjson's output (`_literals`),
  not from a Python walk, and the record is rebuilt only when something was found (a few %);
- a worker remembers the strings it already scanned clean (`CleanCache`: tool schemas, prompts,
  keys) and scans only new ones, those of `SCAN_BATCH` records in one pass (`_scan_many`).
Both rest on one property of the detectors: what they find in a string depends on that string
alone, never on the strings batched around it (tests/test_detectors.py, tests/test_redact_perf_*).
"""
from __future__ import annotations

import argparse
import bisect
import re
from collections import Counter
from itertools import filterfalse
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import orjson

from schemas.params import RedactParams
from schemas.records import BUCKETS, Reject
from stages.core import (KeyedHasher, atomic_dir, atomic_open, dumps, line_blocks, load_key, load_params,
                         write_json)
from stages.detectors import BATCH_SEP, Finding, Placeholders, Redactor, merge_findings, rule_sets, structural_secrets
from stages.executor import Executor
from stages.readers import (SESSION_FORMATS, ParseError, arguments_as_text, arguments_as_values, normalize, parse_line,
                            session_traces, sniff_file)
from stages.scanning import rebuild_strings, redactor_from, strings_into


# ---------------------------------------------------------------- discovery
def discover(raw_root: Path) -> tuple[list[tuple[str, str, Path]], list[Reject]]:
    """(relative path, bucket, path) for every *.jsonl under a known sub-folder, sorted.

    Files elsewhere are rejected whole rather than silently ignored.
    """
    files, rejects = [], []
    for path in sorted(raw_root.rglob("*")):
        rel = path.relative_to(raw_root).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        top = rel.split("/", 1)[0]
        if path.is_symlink():
            rejects.append(Reject(file=rel, line=0, reason="symlink", detail="symlinks are not followed"))
        elif path.name.startswith(".") or path.name.endswith(".dvc"):
            continue
        elif not rel.endswith(".jsonl"):
            rejects.append(Reject(file=rel, line=0, reason="not_jsonl"))
        elif top not in BUCKETS or "/" not in rel:
            rejects.append(Reject(file=rel, line=0, reason="unknown_folder", detail=f"expected one of {sorted(BUCKETS)}"))
        else:
            files.append((rel, BUCKETS[top], path))
    return files, rejects


# Raw files are cut into blocks of whole lines that the workers read themselves: the parent only
# finds line ends and counts them (C-speed), instead of splitting, pickling and sending every line.
BLOCK_BYTES = 1 << 20


def plan_blocks(files: Iterable[tuple[str, str, Path]],
                block: int = BLOCK_BYTES) -> Iterator[tuple[str, str, str, int, int, int]]:
    """(rel, bucket, path, offset, length, first line number) for blocks of whole lines, in file order."""
    for rel, bucket, path in files:
        for blk in line_blocks(path, block, numbered=True):
            yield (rel, bucket, *blk)


# A block of work: (bytes, pieces), a piece being (rel, bucket, path, offset, length, first line, mode). The
# mode is None for lines cut as usual, a session format (a file read whole: a trace spans many lines), or
# SNIFF: a small file whose worker sniffs it first.
Piece = tuple[str, str, str, int, int, int, "str | None"]
SNIFF = "sniff"


def plan_work(files: Iterable[tuple[str, str, Path]], block: int = BLOCK_BYTES) -> Iterator[tuple[int, tuple[Piece, ...]]]:
    """The executor's blocks, in file order. A file of `block` bytes or more is sniffed here: a session file
    (Claude Code, Codex) is one piece read whole by one worker, any other file is cut into blocks of whole
    lines. Smaller files (one session each, mostly: thousands of them) are grouped into blocks of about
    `block` bytes and sniffed by the worker that reads them, so the parent opens none of them and the pool
    sends one task per megabyte, not one per file."""
    group: list[Piece] = []
    size = 0
    for rel, bucket, path in files:
        n = path.stat().st_size
        if not n:
            continue  # no lines: nothing to read or count
        if n < block:
            group.append((rel, bucket, str(path), 0, n, 1, SNIFF))
            size += n
            if size >= block:
                yield size, tuple(group)
                group, size = [], 0
            continue
        if group:
            yield size, tuple(group)
            group, size = [], 0
        fmt = sniff_file(path)
        if fmt in SESSION_FORMATS:
            yield n, ((rel, bucket, str(path), 0, n, 1, fmt),)
        else:
            for blk in plan_blocks([(rel, bucket, path)], block):
                yield blk[4], ((*blk, None),)
    if group:
        yield size, tuple(group)


def block_lines(path: str, offset: int, length: int, first: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) for every physical line of a block; None for a blank line (counted, not parsed)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # the empty piece after the last newline is not a line
    for lineno, raw in enumerate(lines, start=first):
        raw = raw.rstrip(b"\r\n")
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        yield lineno, (raw if raw.strip() else None)


# ---------------------------------------------------------------- redaction of one record
# The joined text of a trace is built from orjson's output rather than by a Python walk (strings_into
# costs ~0.4 us a string, ~60 strings a trace). orjson writes a dict's keys and values in the same
# order as strings_into visits them, and every string as a JSON literal between two unescaped quotes, so
# splitting its output on '"' gives the literals at the odd positions. Joining them with the JSON form
# of the separator and decoding once yields exactly `BATCH_SEP.join(texts)`. A quote inside a string
# is written `\"`; before splitting, escaped backslashes and escaped quotes become control bytes that
# orjson never writes unescaped (it escapes everything below 0x20), and are put back before decoding.
_SEP_JSON = orjson.dumps(BATCH_SEP)[1:-1]
_ESC_BS, _ESC_Q = b"\x01\x01", b"\x02"


def _dump(fields: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(fields)
    except orjson.JSONEncodeError:  # only for callers that built fields without orjson (ints > 64 bits)
        return b""


def _split(fields: dict[str, Any], data: bytes | None = None) -> tuple[list[bytes], bool, bool, bytes]:
    """orjson's output (`data`, if the caller has it) split on unescaped quotes (literals at odd
    positions), whether escapes were hidden, whether a '<' occurs, and the output (escapes hidden)."""
    data = _dump(fields) if data is None else data
    if not data:
        return [], False, False, b""
    hidden = b'\\"' in data
    if hidden:  # left to right, `\\` pairs first: a `\\` before a quote is an escaped backslash
        data = data.replace(b"\\\\", _ESC_BS).replace(b'\\"', _ESC_Q)
    return data.split(b'"'), hidden, b"<" in data, data


def _literals(fields: dict[str, Any]) -> tuple[list[bytes], bool, bool]:
    """The JSON string literals (without quotes) of `fields` in strings_into order; whether escapes were
    hidden; whether any string holds a '<' (orjson never escapes it), i.e. may hold a placeholder."""
    parts, hidden, lt, _ = _split(fields)
    return parts[1::2], hidden, lt


# An object member whose key holds a secret-ish root and whose value is a string, in orjson's compact
# output (only keys end in `":"`). Most records hold no root at all: a few C-level finds rule them out.
# The same pass notes where a secret's name is not its own key, so that only those records are walked
# in Python (detectors.structural_secrets): a root before `":{` (a tool-schema property whose `default`
# or `example` is a sample value) or before `","value":` (`{"name": "DB_PASSWORD", "value": "..."}`:
# env lists, k8s env, HAR headers).
_ROOTS = (b"pass", b"pwd", b"secret", b"token", b"key", b"auth", b"cred", b"cookie", b"birth", b"dob", b"ssn", b"mail")
_KEYED = re.compile(rb"(?:" + b"|".join(_ROOTS) + rb')[^"]{0,64}"'  # starts at a root: _keyed_matches
                    rb'(?::"|:\{|,"(?:value|val|default|secret|data|stringvalue|string_value)":)')
# Keys that hold a person (not a bare `name`: every tool and function has one).
_PERSON_KEYED = re.compile(rb'"(?:full_?name|first_?name|given_name|last_?name|surname|family_name|display_?name|'
                           rb'customer(?:_name)?|contact(?:_name)?|patient(?:_name)?|recipient_name|sender_name|author|'
                           rb'assignee|owner_name|account_holder|card_?holder|employee_name|user_full_name)":"')


def _keyed_secrets(data: bytes, hidden: bool, redactor: Redactor, fields: dict[str, Any] | None = None,
                   canaries: Sequence[tuple[str, bytes]] = ()) -> list[tuple[str, str, str]]:
    """(value, detector, kind) for every value the record's structure names secret: `"<secret-ish
    key>": "<string>"` members, sibling-name pairs and schema defaults, PII named by its key
    (`"birthdate"`), and the team's canaries.

    The detectors see one string at a time, so `{"password": "hunter2"}` (tool-call arguments, metadata)
    would pass: the key names the secret, the value alone looks like nothing. Each value found is then
    replaced wherever it occurs in the record (prose, arguments, results, metadata, dict keys)."""
    found = [(c, "canary", "SECRET") for c, lit in canaries if lit in data]
    low = data.lower()
    for r in _ROOTS:
        if r in low:
            members, nested = _members(_keyed_matches(low), data, low, hidden, redactor)
            found += members
            if nested and fields is not None:
                found += structural_secrets(fields, redactor)
            break
    if redactor.names:  # `"full_name": "Jane Doe"`, `"customer": "..."` (params redact.names)
        found += _members(_PERSON_KEYED.finditer(low), data, low, hidden, redactor)[0]
    return found


def _keyed_matches(low: bytes) -> Iterator[re.Match]:
    """What `_KEYED.finditer(low)` yields, found faster: a match can only start at a root word, so only
    those places are tried (C-level finds instead of the regex engine at every byte, ~75 us a record),
    in order, each at or after the end of the previous match: finditer's own rule."""
    starts = set()
    for r in _ROOTS:
        i = low.find(r)
        while i >= 0:
            starts.add(i)
            i = low.find(r, i + 1)
    end = 0
    for i in sorted(starts):
        if i >= end and (m := _KEYED.match(low, i)):
            end = m.end()
            yield m


def _members(matches: Iterable[re.Match], data: bytes, low: bytes, hidden: bool,
             redactor: Redactor) -> tuple[list[tuple[str, str, str]], bool]:
    """Redactor.key_value on every `"key":"string"` member among `matches` (of _KEYED or _PERSON_KEYED, in
    orjson's compact output); and whether a match was a nested shape that needs the structural walk."""
    found, nested = [], False
    for m in matches:
        tail = m.group()[-2:]
        if tail != b':"':
            # a schema property (`"api_key":{`) matters only if the record has sample values at all
            nested = nested or tail != b':{' or b'"default":' in low or b'"example' in low or b'"const":' in low
            continue
        ks = m.start() + 1 if low[m.start()] == 0x22 else low.rfind(b'"', 0, m.start()) + 1  # 0x22: the key's quote
        ve = data.find(b'"', m.end())
        if ks < 2 or data[ks - 2] not in b"{," or ve < 0:
            continue
        key = _decode(b'"' + data[ks:m.end() - 3] + b'"', hidden)
        value = _decode(b'"' + data[m.end():ve] + b'"', hidden)
        hit = redactor.key_value(key, value)
        if hit:
            found.append((value, *hit))
    return found, nested


def _decode(json_text: bytes, hidden: bool) -> Any:
    if hidden:
        json_text = json_text.replace(_ESC_Q, b'\\"').replace(b"\x01", b"\\")
    return orjson.loads(json_text)


class CleanCache:
    """Strings (as their JSON literals) that a full scan found nothing in, per worker process.

    Tool schemas, system prompts, dict keys and metadata recur in most traces (~60% of the scanned
    chars of the bench corpus, ~90% of the strings). What the detectors find in a string depends on
    that string alone (context never crosses a batch separator, see detectors._after_nul and the
    tests), so a string once scanned clean is clean again: only new strings are scanned. A memo of
    the detectors' own result, not a skip: a string enters only after every detector ran on it.
    """

    def __init__(self, max_entries: int = 200_000):
        self.max_entries = max_entries
        self.clean: set[bytes] = set()

    def add(self, lits: list[bytes]) -> None:
        if len(self.clean) + len(lits) > self.max_entries:
            self.clean.clear()  # bounded memory; the recurring strings come straight back
        self.clean.update(lits)


class _Pending:
    """A record between `_prepare` (strings taken out) and `_finish` (findings applied)."""

    __slots__ = ("fields", "table", "lits", "hidden", "todo", "text", "done", "keyed")

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields
        self.table = Placeholders()
        self.lits: list[bytes] = []
        self.hidden = False
        self.todo: list[bytes] = []  # the literals to scan: those not known clean
        self.text = ""  # BATCH_SEP.join(decoded todo): what the detectors scan for this record
        self.done: dict[str, Any] | None = None  # set when the record was redacted on the spot
        self.keyed: list[tuple[str, str, str]] = []  # secrets named by their key (_keyed_secrets)


def _cleared(data: bytes, redactor: Redactor, canaries: Sequence[tuple[str, bytes]]) -> bool:
    """Whether a record whose compact JSON (orjson's output, tool-call arguments parsed) is `data` holds
    nothing to redact: the prefilter (Redactor.nothing_to_find) proves that neither a detector nor a
    secret-named key can find anything, and no canary occurs. Such a record is done as it is: no strings
    taken out, no keyed search, no scan, no memo, no rebuild (tests/test_redact_fast.py: same bytes)."""
    return bool(data) and not any(lit in data for _, lit in canaries) and redactor.nothing_to_find(data)


def _prepare(fields: dict[str, Any], redactor: Redactor, cache: CleanCache | None,
             canaries: Sequence[tuple[str, bytes]] = (), fast: bool = True) -> _Pending | None:
    """Take every string out of a normalised record (dict keys and tool-call argument values
    included) and reserve the placeholders already in them; the scan itself comes later. None for a
    record `_cleared`: it is done as it is, tool-call arguments back to text (`fast=False` forces the
    full path). No _Pending is built for those ~90% of records."""
    arguments_as_values(fields["messages"])
    data = _dump(fields)
    if fast and _cleared(data, redactor, canaries):
        arguments_as_text(fields["messages"])
        return None
    return _prepare_full(fields, data, redactor, cache, canaries)


def _prepare_full(fields: dict[str, Any], data: bytes, redactor: Redactor, cache: CleanCache | None,
                  canaries: Sequence[tuple[str, bytes]]) -> _Pending:
    """_prepare for a record the prefilter did not clear (`data`: its orjson output)."""
    p = _Pending(fields)
    parts, p.hidden, lt, data = _split(fields, data)
    p.lits = parts[1::2]
    p.keyed = _keyed_secrets(data, p.hidden, redactor, fields, canaries)
    if len(p.lits) < 2:  # redact_many redacts a lone string on its own; keep that path exact (and the walk)
        texts: list[str] = []
        strings_into(fields, texts)
        p.done = rebuild_strings(fields, iter(redactor.redact_many(texts, p.table)))
        return p
    if lt:  # placeholders are reserved from every string, the cached ones too
        for lit in p.lits:
            if b"<" in lit:
                p.table.reserve(_decode(b'"' + lit + b'"', p.hidden))
    # A record with a keyed secret scans every string: the value is redacted wherever it appears.
    p.todo = p.lits if cache is None or p.keyed else list(filterfalse(cache.clean.__contains__, p.lits))
    if p.todo:
        p.text = _decode(b'"' + _SEP_JSON.join(p.todo) + b'"', p.hidden)
    return p


def _scan_many(pending: list[_Pending], redactor: Redactor) -> list[list[Finding]]:
    """One scan over the texts of many records; each record's findings, relative to its own text.

    What is found in a string depends on that string alone (context stops at the separator's NUL),
    so one scan over many records finds what a scan per record would; it saves the fixed cost of a
    scan (encode, translate, a dozen literal finds) per record.
    """
    starts, pos, texts = [], 0, []
    for p in pending:
        starts.append(pos)
        texts.append(p.text)
        pos += len(p.text) + len(BATCH_SEP)
    per: list[list[Finding]] = [[] for _ in pending]
    found = redactor.scan(BATCH_SEP.join(texts)) if pos > len(BATCH_SEP) * len(pending) else []
    for f in found:
        k = bisect.bisect_right(starts, f.start) - 1
        base = starts[k]
        per[k].append(Finding(f.detector, f.kind, f.start - base, f.end - base))
    return per


def _positions(lits: list[bytes], todo: list[bytes]) -> list[int]:
    """Where the scanned literals sit among all of them. `todo` is `lits` less the values that were
    cached clean at _prepare time (the cache may have grown since, so it is not asked again); equal
    values were kept or dropped together, so matching in order is exact."""
    idx, j = [], 0
    for i, lit in enumerate(lits):
        if j < len(todo) and lit == todo[j]:
            idx.append(i)
            j += 1
    return idx


def _keyed_findings(p: _Pending) -> list[Finding]:
    """Every occurrence of a keyed secret's value in the record's text, the key's own value included.
    A short value (< 6 chars) counts only where it is not part of a longer word or number."""
    out, text = [], p.text
    for value, detector, kind in p.keyed:
        n, short = len(value), len(value) < 6
        i = text.find(value)
        while i >= 0:
            if not short or not ((i and text[i - 1].isalnum()) or (i + n < len(text) and text[i + n].isalnum())):
                out.append(Finding(detector, kind, i, i + n))
            i = text.find(value, i + n)
    return out


def _finish(p: _Pending, found: list[Finding], redactor: Redactor,
            cache: CleanCache | None) -> tuple[dict[str, Any], Counter]:
    """Apply a record's findings (if any) and turn tool-call arguments back into JSON text."""
    if p.keyed:  # other sources: merged so that spans are sorted and disjoint (the glaive leak, issue 10)
        found = merge_findings(found + _keyed_findings(p))
    if p.done is not None:
        out = p.done
    elif found:  # rare (a few % of traces): only then split into strings and rebuild the record
        texts = _decode(b'["' + b'","'.join(p.lits) + b'"]', p.hidden)
        idx = _positions(p.lits, p.todo)
        for i, t in zip(idx, redactor.settle_many([texts[i] for i in idx], found, p.table)):
            texts[i] = t
        out = rebuild_strings(p.fields, iter(texts))
    else:
        out = p.fields  # nothing to replace: rebuild_strings would only copy it
        if cache is not None and p.todo:
            cache.add(p.todo)
    arguments_as_text(out["messages"])
    return out, p.table.counts


def canary_literals(canaries: Iterable[str]) -> list[tuple[str, bytes]]:
    """(canary, its JSON-escaped form): what `_keyed_secrets` looks for in orjson's output."""
    return [(c, orjson.dumps(c)[1:-1]) for c in canaries if c]


def redact_fields(fields: dict[str, Any], redactor: Redactor, cache: CleanCache | None = None,
                  canaries: Sequence[tuple[str, bytes]] = (), fast: bool = True) -> tuple[dict[str, Any], Counter]:
    """Redact every string of a normalised record; returns it with per-detector counts."""
    p = _prepare(fields, redactor, cache, canaries, fast)
    if p is None:
        return fields, Counter()
    return _finish(p, _scan_many([p], redactor)[0], redactor, cache)


def eligibility(fields: dict[str, Any], params: RedactParams) -> list[str]:
    extra = fields["extra"]
    reasons = []
    if fields["review"]["status"] == "rejected":
        reasons.append("review_rejected")
    if extra.get("raw_input_stored") is True:
        reasons.append("raw_input_stored")
    status = extra.get("redaction_status")
    if isinstance(status, str) and status in params.untrusted_statuses:
        reasons.append(f"redaction_status_{status}")
    if extra.get("trainable") is False:
        reasons.append("marked_untrainable")
    return reasons


# The clean-record fast path (Redactor.nothing_to_find; tests/test_redact_fast.py shows it gives the full
# path's bytes). On the bench corpus (N = 20,000, one process) it clears 89% of records at ~20 us each with
# Hyperscan and takes ~15% of redact's CPU away (2.1 s -> 1.8 s); its pure-Python checks clear 70% at ~65 us
# and cost more than they save (-> 3.0 s), so without Hyperscan every record takes the full path.
FAST_PATH = True

# Records whose new strings are scanned in one pass: enough to spread a scan's fixed cost, few enough
# that strings recurring in the next records are already in the clean cache by then.
SCAN_BATCH = 32


class Worker:
    """Per-process state: the compiled detectors and the keyed hasher."""

    def __init__(self, params: RedactParams, key: bytes, fast: bool = FAST_PATH):
        self.params = params
        self.fast = fast  # False: every record takes the full path (tests compare the two)
        self.hasher = KeyedHasher(key)
        self.redactor = redactor_from(params)
        self.cache = CleanCache()
        self.fast = self.fast and self.redactor.has_compiled_prefilter
        # Canaries are replaced wherever they occur (value-level defence); leaks still checks for them.
        self.canaries = canary_literals(params.canaries) if "canary" not in params.disabled_detectors else []

    def __call__(self, item: tuple[str, str, int, bytes]) -> tuple:
        rel, bucket, lineno, raw = item
        return self.block(rel, bucket, [(lineno, raw)])[0]

    def block(self, rel: str, bucket: str, lines: list[tuple[int, Any]]) -> list[tuple]:
        """For each (line number, bytes), in order: ("reject", payload, reason) or ("trace", payload, id, line,
        counts, ineligible, omitted), the last three None when empty (the parent keeps the first trace of
        each id, so the per-trace figures travel with it). A session's line comes as its normalised fields
        (or its ParseError) instead of bytes.

        Records are parsed one by one; those the prefilter clears are finished on the spot, the new strings
        of the others scanned together in one pass, then finished.
        """
        results: list[Any] = [None] * len(lines)
        for i in range(0, len(lines), SCAN_BATCH):
            self._batch(rel, bucket, lines, i, results)
        return results

    def _batch(self, rel: str, bucket: str, lines: list[tuple[int, Any]], first: int, results: list[Any]) -> None:
        pending: list[tuple[int, int, Any, list[str], _Pending]] = []
        for slot in range(first, min(first + SCAN_BATCH, len(lines))):
            lineno, raw = lines[slot]
            try:
                fields = self._fields(raw)
            except ParseError as exc:
                rej = Reject(file=rel, line=lineno, reason=exc.reason, detail=exc.detail)
                results[slot] = ("reject", dumps(rej), exc.reason)
                continue
            source_id = fields.pop("source_id")
            ineligible = eligibility(fields, self.params)
            p = _prepare(fields, self.redactor, self.cache, self.canaries, self.fast)
            if p is None:  # cleared by the prefilter (~90% of records): finished on the spot
                results[slot] = self.trace(fields, None, source_id, ineligible, rel, bucket, lineno)
                continue
            pending.append((slot, lineno, source_id, ineligible, p))
        found = _scan_many([p for *_, p in pending], self.redactor)
        for (slot, lineno, source_id, ineligible, p), f in zip(pending, found):
            fields, counts = _finish(p, f, self.redactor, self.cache)
            results[slot] = self.trace(fields, counts, source_id, ineligible, rel, bucket, lineno)

    def _fields(self, raw: Any) -> dict[str, Any]:
        """A line's normalised fields; raises ParseError."""
        if not isinstance(raw, bytes):  # a session's trace, normalised already (or its ParseError)
            if isinstance(raw, ParseError):
                raise raw
            return raw
        if len(raw) > self.params.max_line_bytes:
            raise ParseError("line_too_long", f"{len(raw)} bytes > max_line_bytes {self.params.max_line_bytes}")
        return normalize(parse_line(raw))

    def trace(self, fields: dict[str, Any], counts: Counter | None, source_id: str | None, ineligible: list[str],
              rel: str, bucket: str, lineno: int) -> tuple:
        """The trace's line and figures (see `block`); `fields` becomes the record (the caller is done with it)."""
        # Id-less rows are named by where they sit; the snapshot's file names are content-derived.
        tid = self.hasher(f"id:{source_id}" if source_id is not None else f"line:{rel}:{lineno}", "trace")
        omitted = fields.pop("omitted", None) or None  # what was kept out of the messages, by kind
        fields["id"] = tid
        fields["source_file"] = rel
        fields["source_line"] = lineno
        fields["bucket"] = bucket
        fields["source_run_id_hash"] = self.hasher(source_id, "run") if source_id is not None else None
        fields["trainable"] = not ineligible
        fields["ineligible"] = ineligible
        fields["redactions"] = dict(counts) if counts else {}  # keys sorted by dumps
        fields["omitted"] = omitted
        payload = dumps({k: v for k, v in fields.items() if v is not None})
        return "trace", payload, tid, lineno, counts or None, ineligible or None, omitted


def _session_lines(fmt: str, lines: list[tuple[int, bytes]], max_line_bytes: int) -> tuple[list[tuple], int]:
    """A session file's lines -> ((first line, fields or ParseError) per trace or rejected line, lines merged
    into traces beyond their first)."""
    parsed = []
    for lineno, raw in lines:
        try:
            if len(raw) > max_line_bytes:
                raise ParseError("line_too_long", f"{len(raw)} bytes > max_line_bytes {max_line_bytes}")
            parsed.append((lineno, parse_line(raw)))
        except ParseError as exc:
            parsed.append((lineno, exc))
    out, merged = [], 0
    for first, rec, took in session_traces(fmt, parsed):
        out.append((first, rec))
        merged += took - 1
    return out, merged


def redact_block(worker: Worker, block: tuple[int, tuple[Piece, ...]]) -> list[tuple[str, str, int, int, list[tuple], int]]:
    """The executor's per-block function (pure but for the worker's memo of clean strings): for each piece,
    (rel, bucket, lines, blank lines, results in line order, lines merged into sessions)."""
    return [_piece(worker, piece) for piece in block[1]]


def _piece(worker: Worker, piece: Piece) -> tuple[str, str, int, int, list[tuple], int]:
    """One piece -> (rel, bucket, lines, blank lines, results in line order, lines merged into sessions).

    A result is ("reject", payload, reason) or ("trace", payload, id, line, counts, ineligible, omitted); the
    parent keeps the first trace of each id, so the per-trace figures travel with it. A session file's piece
    is grouped into its traces first.
    """
    rel, bucket, path, offset, length, first, fmt = piece
    if fmt == SNIFF:
        fmt = sniff_file(path)
        fmt = fmt if fmt in SESSION_FORMATS else None
    lines = blank = merged = 0
    todo: list[tuple[int, Any]] = []
    for lineno, raw in block_lines(path, offset, length, first):
        lines += 1
        if raw is None:
            blank += 1
        else:
            todo.append((lineno, raw))
    if fmt is not None:
        todo, merged = _session_lines(fmt, todo, worker.params.max_line_bytes)
    return rel, bucket, lines, blank, worker.block(rel, bucket, todo), merged


_LINE_MASK = (1 << 40) - 1


class _Tally:
    """What the parent counts while it writes: the figures of metrics/redact.json."""

    def __init__(self, files: int):
        self.stats: Counter = Counter(files=files)
        self.reasons: Counter = Counter()
        self.detectors: Counter = Counter()
        self.ineligible: Counter = Counter()
        self.by_bucket: Counter = Counter()
        self.omitted: Counter = Counter()
        self.with_redactions = 0
        # trace id (as an int) -> where it first occurred (file number << 40 | line): 155 MB for 1M traces,
        # against 198 MB for a {hex id: (file, line)} table (measured alone, README "Performance")
        self.seen: dict[int, int] = {}
        self.rels: list[str] = []
        self.rel_no: dict[str, int] = {}

    def piece(self, result: tuple[str, str, int, int, list[tuple], int], ft: Any, fr: Any) -> None:
        """Write one piece's traces and rejects; the first trace of an id wins, later ones are rejects."""
        rel, bucket, lines, blank, out, merged = result
        if rel not in self.rel_no:
            self.rel_no[rel] = len(self.rels)
            self.rels.append(rel)
        here = self.rel_no[rel] << 40
        self.stats["lines"] += lines
        self.stats["blank_lines"] += blank
        self.stats["merged_lines"] += merged
        kept: list[bytes] = []
        for r in out:
            if r[0] == "reject":
                fr.write(r[1] + b"\n")
                self.reasons[r[2]] += 1
                continue
            _, payload, tid, lineno, counts, inel, omitted = r
            key = int(tid, 16)
            first = self.seen.get(key)
            if first is not None:
                where = f"{self.rels[first >> 40]}:{first & _LINE_MASK}"
                rej = Reject(file=rel, line=lineno, reason="duplicate_id", detail=f"same id as {where}")
                fr.write(dumps(rej) + b"\n")
                self.reasons["duplicate_id"] += 1
                continue
            self.seen[key] = here | lineno
            kept.append(payload)
            if counts:
                self.detectors.update(counts)
                self.with_redactions += 1
            if omitted:
                self.omitted.update(omitted)
            if inel:
                self.ineligible.update(inel)
            else:
                self.stats["trainable"] += 1
        if kept:
            kept.append(b"")
            ft.write(b"\n".join(kept))  # one write a piece; the trailing b"" ends the last line
        self.stats["traces"] += len(kept) - 1 if kept else 0
        self.by_bucket[bucket] += len(kept) - 1 if kept else 0


def run(raw_root: Path, out_traces: Path, out_rejects: Path, params: RedactParams, key: bytes) -> dict[str, Any]:
    """Stream the snapshot through the executor; returns the metrics dict."""
    files, file_rejects = discover(raw_root)
    tally = _Tally(len(files))
    blocks = list(plan_work(files))
    # Built once here (detectors compiled, Hyperscan database included): forked workers inherit it.
    worker = Worker(params, key)
    executor = Executor.from_setting(params.workers)
    with atomic_open(out_traces) as ft, atomic_open(out_rejects) as fr:
        for rej in file_rejects:
            fr.write(dumps(rej) + b"\n")
            tally.reasons[rej.reason] += 1
        # block order, whatever the worker count or timing: the output does not depend on either
        for result in executor.map(redact_block, blocks, worker, label="redact", length_at=0,
                                   records=lambda res: sum(r[2] - r[3] for r in res)):
            for piece in result:
                tally.piece(piece, ft, fr)
    return _metrics(tally.stats, tally.reasons, tally.detectors, tally.ineligible, tally.by_bucket, tally.omitted,
                    tally.with_redactions, len(file_rejects), key)


def _metrics(stats: Counter, reasons: Counter, detectors: Counter, ineligible: Counter, by_bucket: Counter,
             omitted_kinds: Counter, traces_with_redactions: int, file_level: int, key: bytes) -> dict[str, Any]:
    """metrics/redact.json, after checking that every line ended in exactly one place."""
    rejected = sum(reasons.values())
    records = stats["lines"] - stats["blank_lines"]
    # every line ends in exactly one place: a trace of its own, a session's trace (merged), or a reject
    if stats["traces"] + stats["merged_lines"] + rejected - file_level != records:
        raise RuntimeError(f"accounting broken: {records} lines != {stats['traces']} traces + {stats['merged_lines']} "
                           f"merged + {rejected - file_level} rejects")
    return {
        "files": stats["files"], "lines": stats["lines"], "blank_lines": stats["blank_lines"], "records": records,
        "traces": stats["traces"], "trainable": stats["trainable"], "rejected": rejected,
        "rejects_by_reason": dict(sorted(reasons.items())), "ineligible_by_reason": dict(sorted(ineligible.items())),
        "redactions_by_detector": dict(sorted(detectors.items())), "redactions": sum(detectors.values()),
        "traces_with_redactions": traces_with_redactions, "traces_by_bucket": dict(sorted(by_bucket.items())),
        "session_lines_merged": stats["merged_lines"], "omitted_by_kind": dict(sorted(omitted_kinds.items())),
        "key_fingerprint": KeyedHasher(key).fingerprint(),
        "rules": rule_sets(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--raw", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--metrics", required=True, type=Path)
    args = ap.parse_args(argv)
    params = load_params(args.params, "redact", RedactParams)
    key = load_key()
    with atomic_dir(args.out) as tmp:
        metrics = run(args.raw, tmp / "traces.jsonl", tmp / "rejects.jsonl", params, key)
    write_json(args.metrics, metrics)
    merged = f" ({metrics['session_lines_merged']} of them session events)" if metrics["session_lines_merged"] else ""
    print(f"redact: {metrics['records']} records{merged} -> {metrics['traces']} traces ({metrics['trainable']} trainable), "
          f"{metrics['rejected']} rejected, {metrics['redactions']} redactions in {metrics['traces_with_redactions']} traces")


if __name__ == "__main__":
    main()
