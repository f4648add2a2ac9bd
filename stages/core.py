"""The small shared core: atomic orjson I/O, xxhash content ids, keyed id hashing, params loading.

Every stage writes through these helpers so that outputs are byte-deterministic (sorted keys,
one record per line) and never half-written (temp file, fsync, os.replace).
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import orjson
import xxhash
import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

_DUMP_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY
_JSON_OPTS = _DUMP_OPTS | orjson.OPT_INDENT_2


def dumps(obj: Any) -> bytes:
    """Canonical compact JSON bytes: sorted keys, no whitespace."""
    return orjson.dumps(_plain(obj), option=_DUMP_OPTS)


def _plain(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json", exclude_none=True)
    return obj


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry itself is flushed.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync it and os.replace it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write one canonical JSON record per line, atomically. Returns the record count."""
    n = 0
    with atomic_open(path) as fh:
        for rec in records:
            fh.write(dumps(rec))
            fh.write(b"\n")
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path) as fh:
        fh.write(orjson.dumps(_plain(obj), option=_JSON_OPTS))
        fh.write(b"\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text.encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    return orjson.loads(Path(path).read_bytes())


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw bytes without the newline) for every non-blank line.

    Bytes, not str: decoding errors are a per-line reject decided by the caller, not a crash.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            raw = raw.rstrip(b"\r\n")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 BOM is an editor artefact, not data
            if raw.strip():
                yield lineno, raw


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Read a JSONL file that this pipeline wrote itself (trusted: any error is a bug, so raise)."""
    for lineno, raw in iter_lines(path):
        try:
            yield orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON in a pipeline output: {exc}") from exc


def read_model(path: str | os.PathLike, model: type[M]) -> M:
    """A JSON file one stage wrote and another reads, validated by its model in schemas/."""
    try:
        return model.model_validate_json(Path(path).read_bytes())
    except ValidationError as exc:
        raise ValueError(f"{path}: not a valid {model.__name__}: {exc}") from exc


def read_models(path: str | os.PathLike, model: type[M]) -> Iterator[M]:
    """The records of a JSONL file one stage wrote and another reads, each validated by its model;
    an invalid line is an error naming the file and line (the writer is this pipeline: a bug)."""
    for lineno, raw in iter_lines(path):
        try:
            yield model.model_validate_json(raw)
        except ValidationError as exc:
            raise ValueError(f"{path}:{lineno}: not a valid {model.__name__}: {exc}") from exc


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a whole output folder in a temp folder beside it, then swap it in.

    Stale files from an earlier run never linger, and a crash leaves the old folder intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        # Left by a killed run; DVC's lock means no live run of this stage can own it.
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def content_id(obj: Any) -> str:
    """Stable 128-bit content id of a JSON-able value (or raw bytes/str)."""
    if isinstance(obj, bytes):
        data = obj
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
    else:
        data = dumps(obj)
    return xxhash.xxh3_128_hexdigest(data)


def unit_hash(*parts: str | int) -> float:
    """Map parts to a uniform float in [0, 1): the basis of hash-stable splits and shares."""
    h = xxhash.xxh3_64_intdigest("\x1f".join(str(p) for p in parts).encode("utf-8"))
    return h / 2.0**64


class KeyedHasher:
    """Keyed BLAKE2b for ids: a plain hash of a guessable id (run_001) can be reversed by guessing."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("the id hashing key must be at least 16 bytes")
        self._key = hashlib.blake2b(key, digest_size=32).digest()

    def __call__(self, value: str, kind: str = "id") -> str:
        h = hashlib.blake2b(value.encode("utf-8"), key=self._key, digest_size=12, person=kind.encode()[:16])
        return h.hexdigest()

    def fingerprint(self) -> str:
        """Safe to publish: tells two machines whether they used the same key, reveals nothing of it."""
        return hashlib.blake2b(b"agent-flywheel key fingerprint", key=self._key, digest_size=6).hexdigest()


KEY_ENV, KEY_FILE_ENV = "FLYWHEEL_ID_KEY", "FLYWHEEL_ID_KEY_FILE"
LEGACY_KEY_FILE = Path(".flywheel") / "id_key"  # relative to the repo root, where DVC runs every stage


def user_key_path(env: Mapping[str, str] | None = None) -> Path:
    """The per-user key file: $XDG_CONFIG_HOME/agent-flywheel/id_key (default ~/.config/...).

    Outside the repo on purpose: `dvc exp run --queue/--temp` runs in a temp copy that holds only
    tracked files (DVC issue #8854), so a key kept as an untracked file in the repo is not there.
    """
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "agent-flywheel" / "id_key"


def _read_key_file(path: Path) -> bytes:
    key = path.read_bytes().strip()
    if not key:
        raise SystemExit(f"no id-hashing key: {path} is empty (delete it and run `make key`, or put the team key in it)")
    return key


def find_key(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> tuple[bytes, str]:
    """(key, where it came from), searched in order: FLYWHEEL_ID_KEY, the file FLYWHEEL_ID_KEY_FILE
    names, the per-user file (user_key_path), then the repo's .flywheel/id_key of earlier versions.

    `where` names a variable or a path, never the key. No default key: a public default would make
    keyed hashes as guessable as plain ones.
    """
    env = os.environ if env is None else env
    if env.get(KEY_ENV):
        return env[KEY_ENV].encode("utf-8"), KEY_ENV
    if env.get(KEY_FILE_ENV):
        # Set explicitly: a missing file is a mistake to report, not a reason to look elsewhere.
        path = Path(env[KEY_FILE_ENV]).expanduser()
        if not path.is_file():
            raise SystemExit(f"no id-hashing key: {KEY_FILE_ENV}={path} does not exist (fix the path, or unset it "
                             f"and run `make key`)")
        return _read_key_file(path), str(path)
    user, legacy = user_key_path(env), (cwd or Path.cwd()) / LEGACY_KEY_FILE
    if user.is_file():
        key = _read_key_file(user)
        if legacy.is_file() and _read_key_file(legacy) != key:
            # Two keys would hash ids two ways depending on where a stage runs: refuse, name both.
            raise SystemExit(f"two different id-hashing keys: {user} and {legacy}; keep the team's one in {user} "
                             f"and delete {legacy}")
        return key, str(user)
    if legacy.is_file():
        return _read_key_file(legacy), str(LEGACY_KEY_FILE)
    raise SystemExit(f"no id-hashing key: run `make key` (creates {user}), or set {KEY_ENV} or {KEY_FILE_ENV} "
                     f"to the team key (see README, Keys)")


def load_key(env: Mapping[str, str] | None = None) -> bytes:
    """The id-hashing key (see find_key for where it is looked for)."""
    key, where = find_key(env)
    if where == str(LEGACY_KEY_FILE):
        print(f"note: the id key came from {LEGACY_KEY_FILE}, which `dvc exp run --queue` can't see; "
              f"`make key` copies it to {user_key_path(env)}", file=sys.stderr)
    return key


def load_params(path: str | os.PathLike, section: str, model: type[M]) -> M:
    """Load one params.yaml section into its extra='forbid' model: an unknown key is an error."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if section not in data:
        raise SystemExit(f"{path}: missing params section '{section}'")
    return model.model_validate(data[section])


_SAFE = re.compile(r"[^a-z0-9_.-]+")


def safe_name(name: str) -> str:
    """A single path component derived from data: never empty, never '..', never a separator."""
    slug = _SAFE.sub("-", str(name).strip().lower()).strip(".-")[:64]
    if not slug or slug != str(name):
        # Keep distinct inputs distinct after slugging, e.g. '../x' vs 'x'.
        slug = f"{slug or 'unnamed'}-{xxhash.xxh3_64_hexdigest(str(name).encode())[:8]}"
    return slug


class SpillSort:
    """Sort (key, bytes) records with bounded memory: sorted runs spill to temp files, merged on read.

    Records are buffered until about `budget` bytes, then sorted and written to a run file in
    `tmp_dir` (which the caller owns and removes). Iterating yields every record in key order; ties
    keep insertion order (stable sort within a run, runs merged in the order they were written), so
    the result equals `sorted(records, key=itemgetter(0))` whatever the budget.
    """

    def __init__(self, tmp_dir: str | os.PathLike, budget: int = 32 << 20):
        self._dir, self._budget = Path(tmp_dir), budget
        self._buf: list[tuple[Any, bytes]] = []
        self._size = 0
        self._runs: list[Path] = []
        self.count = 0

    def add(self, key: Any, data: bytes) -> None:
        # A copy: orjson.dumps returns bytes that keep its whole write buffer allocated (4 KB for a
        # 60-byte line), which held by the hundred thousand is most of the memory.
        self._buf.append((key, bytes(memoryview(data))))
        self._size += len(data) + 200  # + the tuple, the key and the bytes object's own header
        self.count += 1
        if self._size >= self._budget:
            self._spill()

    def _spill(self) -> None:
        self._buf.sort(key=itemgetter(0))
        fd, name = tempfile.mkstemp(prefix="run.", suffix=".tmp", dir=self._dir)
        with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
            for item in self._buf:
                pickle.dump(item, fh, protocol=pickle.HIGHEST_PROTOCOL)  # one object each: no memo to grow
        self._runs.append(Path(name))
        self._buf, self._size = [], 0

    @staticmethod
    def _read(path: Path) -> Iterator[tuple[Any, bytes]]:
        with open(path, "rb", buffering=1 << 20) as fh:
            while True:
                try:
                    yield pickle.load(fh)
                except EOFError:
                    return

    def __iter__(self) -> Iterator[tuple[Any, bytes]]:
        if not self._runs:  # everything fitted: no files at all
            self._buf.sort(key=itemgetter(0))
            return iter(self._buf)
        if self._buf:
            self._spill()
        # heapq.merge breaks key ties by run index: earlier runs (earlier records) first.
        return heapq.merge(*(self._read(p) for p in self._runs), key=itemgetter(0))


def line_blocks(path: str | os.PathLike, block: int = 1 << 20, numbered: bool = False) -> Iterator[tuple]:
    """(path, offset, length) of consecutive blocks of whole lines that cover the file, in order; with
    `numbered`, also the number of the block's first line.

    For handing a file to worker processes that read their blocks themselves: the parent only looks
    for line ends (C speed) instead of splitting, pickling and sending every line.
    """
    with open(path, "rb") as fh:
        offset, lineno, tail = 0, 1, b""
        while True:
            buf = fh.read(block)
            if not buf:
                if tail:  # the last line has no newline
                    yield (str(path), offset, len(tail)) + ((lineno,) if numbered else ())
                return
            data = tail + buf
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: read on to its end
                tail = data
                continue
            yield (str(path), offset, cut) + ((lineno,) if numbered else ())
            if numbered:
                lineno += data.count(b"\n", 0, cut)
            offset += cut
            tail = data[cut:]


def block_lines(path: str, offset: int, length: int) -> Iterator[bytes]:
    """The lines of one line_blocks() block exactly as iter_lines() yields them (without numbers)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    for i, raw in enumerate(data.split(b"\n")):
        raw = raw.rstrip(b"\r\n")
        if i == 0 and offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.strip():
            yield raw


class Progress:
    """Progress of a long stage on stderr: records done, rate, share of the input and ETA.

    Rate-limited: the first line comes after `every` seconds and then at most one per `every`
    seconds, so a small input prints nothing and a large one a line every few seconds. It writes to
    `stream` (stderr) only, never to an output, and what it prints has no effect on any output.
    FLYWHEEL_PROGRESS_SECONDS sets `every` (0: a line per update; "off" or a negative number: silent).
    """

    def __init__(self, label: str, total_bytes: int = 0, every: float | None = None, stream: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total = label, total_bytes
        self.every = _progress_every() if every is None else every
        self.stream, self.clock = stream, clock
        self.records = self.bytes = self.lines = 0
        self.start = self._last = clock()

    def update(self, records: int, nbytes: int = 0) -> None:
        self.records += records
        self.bytes += nbytes
        if self.every < 0:
            return
        now = self.clock()
        if now - self._last >= self.every:
            self._last = now
            self._write(now)

    def _write(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        line = f"{self.label}: {self.records:,} records, {self.records / elapsed:,.0f}/s"
        if self.total and self.bytes:
            share = min(self.bytes / self.total, 1.0)
            eta = elapsed * (1 - share) / share
            line += f", {share:.0%} of {self.total / 1e6:,.1f} MB, ETA {int(eta // 60)}:{int(eta % 60):02d}"
        print(line, file=self.stream or sys.stderr, flush=True)
        self.lines += 1


def _progress_every(default: float = 5.0) -> float:
    raw = os.environ.get("FLYWHEEL_PROGRESS_SECONDS", "").strip().lower()
    if not raw:
        return default
    if raw == "off":
        return -1.0
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"FLYWHEEL_PROGRESS_SECONDS={raw!r}: expected seconds (a number) or 'off'") from None


def progress(results: Iterable[Any], blocks: Sequence[tuple], label: str, records: Callable[[Any], int],
             length_at: int = 2, **kw: Any) -> Iterator[Any]:
    """Yield `results` unchanged (one per block of `blocks`, in order, as pool.imap gives them) while a
    Progress counts `records(result)` records and the block's byte length (blocks[i][length_at])."""
    total = sum(b[length_at] for b in blocks)
    p = Progress(label, total, **kw)
    for res, blk in zip(results, blocks, strict=True):
        p.update(records(res), blk[length_at])
        yield res
