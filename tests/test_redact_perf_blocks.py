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
