"""Workers read blocks of whole lines: every physical line must come out once, with its number,
whatever the block size (BOM, CRLF, blank lines, a last line without newline, lines longer than a block)."""
import io
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.redact import block_lines, plan_blocks


def _reference(data: bytes) -> list[tuple[int, bytes | None]]:
    """What the stage did before blocks: iterate the file's lines."""
    out = []
    for lineno, raw in enumerate(_lines(data), start=1):
        raw = raw.rstrip(b"\r\n")
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        out.append((lineno, raw if raw.strip() else None))
    return out


def _lines(data: bytes) -> list[bytes]:
    return list(io.BytesIO(data))  # binary file iteration: split after each b"\n" only


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([b"{}", b"", b" ", b"\r", b"\xef\xbb\xbf{}", b"x" * 40, b"\t\x0b", b'{"a":"\\n"}']),
                max_size=12),
       st.sampled_from([b"\n", b"\r\n"]), st.booleans(), st.integers(1, 64))
def test_blocks_give_every_line_once(tmp_path: Path, parts, nl, trailing, block):
    data = nl.join(parts) + (nl if trailing and parts else b"")
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    got = []
    for rel, bucket, p, offset, length, first in plan_blocks([("traces/f.jsonl", "real", path)], block=block):
        got += list(block_lines(p, offset, length, first))
    assert got == _reference(data)


def test_grouped_small_files_give_the_bytes_of_one_block_a_file(tmp_path: Path):
    """plan_work groups files smaller than a block (sniffed by the worker that reads them) and cuts larger
    ones: the results, piece by piece in file order, are the same whatever the block size."""
    from conftest import TEST_KEY
    from schemas.params import RedactParams
    from stages.redact import SNIFF, Worker, discover, plan_work, redact_block

    root = Path(__file__).resolve().parent / "fixtures" / "formats"
    raw = tmp_path / "raw" / "traces"
    raw.mkdir(parents=True)
    for f in sorted(root.glob("*.jsonl")):  # Claude Code and Codex sessions among them
        (raw / f.name).write_bytes(f.read_bytes())
    (raw / "empty.jsonl").write_bytes(b"")
    files, _ = discover(tmp_path / "raw")
    worker = Worker(RedactParams(workers=1), TEST_KEY)

    def flat(block: int) -> tuple[list, dict]:
        """The blocks, and per file: lines, blank lines, merged lines and its results in order."""
        blocks = list(plan_work(files, block))
        per: dict = {}
        for b in blocks:
            for rel, _, lines, blank, out, merged in redact_block(worker, b):
                f = per.setdefault(rel, [0, 0, 0, []])
                f[0], f[1], f[2] = f[0] + lines, f[1] + blank, f[2] + merged
                f[3] += out
        return blocks, per

    one_each, want = flat(1)  # every file at least a block: sniffed by the planner, never grouped, lines cut
    grouped, got = flat(1 << 20)  # all in one block, sniffed by the worker
    assert all(p[6] != SNIFF for _, ps in one_each for p in ps)
    assert len(grouped) == 1 and len(grouped[0][1]) == len(files) - 1  # the empty file is no piece
    assert list(got) == list(want) and got == want and sum(len(f[3]) for f in got.values()) >= 14
