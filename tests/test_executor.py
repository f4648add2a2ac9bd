"""The one executor: ordered, deterministic, and shardable by rank (datatrove's model)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import xxhash

from stages.core import block_lines, line_blocks
from stages.executor import Executor, merge_parts, part_name, shard, worker_count


def _upper(state: str, block: tuple) -> bytes:
    """A pure per-block function: its lines, upper-cased and tagged with the state."""
    return b"".join(state.encode() + raw.upper() + b"\n" for raw in block_lines(*block))


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(b'{"i": %d, "h": "%s"}\n' % (i, xxhash.xxh64_hexdigest(str(i).encode()).encode())
                              for i in range(3000)))
    return path


def _run(path: Path, tmp: Path, rank: int, world: int, workers: int) -> Path:
    blocks = list(line_blocks(path, block=4096))  # ~20 blocks: every rank gets several
    out = tmp / part_name("out.jsonl", rank, world)
    with open(out, "wb") as fh:
        for res in Executor(workers, rank, world).map(_upper, blocks, "x"):
            fh.write(res)
    return out


def test_two_ranks_merged_in_rank_order_give_the_bytes_of_one(corpus, tmp_path):
    one = _run(corpus, tmp_path, 0, 1, workers=1).read_bytes()
    assert one.count(b"\n") == 3000 and one.startswith(b'x{"I": 0')
    parts = [_run(corpus, tmp_path, rank, 2, workers=1) for rank in (1, 0)]  # ranks finish in any order
    merge_parts(sorted(parts), tmp_path / "merged.jsonl")
    assert (tmp_path / "merged.jsonl").read_bytes() == one
    assert all(p.stat().st_size > 0 for p in parts)  # both ranks did work


def test_worker_processes_keep_block_order(corpus, tmp_path):
    (tmp_path / "two").mkdir()
    assert _run(corpus, tmp_path / "two", 0, 1, workers=2).read_bytes() == \
        _run(corpus, tmp_path, 0, 1, workers=1).read_bytes()


def test_shards_cover_the_plan_once_in_order():
    blocks = list(range(17))
    for world in (1, 2, 3, 5, 17, 20):
        shards = [list(shard(blocks, r, world)) for r in range(world)]
        assert sum(shards, []) == blocks
    with pytest.raises(ValueError):
        shard(blocks, 2, 2)
    assert part_name("a.jsonl", 0, 1) == "a.jsonl" and part_name("a.jsonl", 1, 2) == "a.jsonl.part-00001-of-00002"
    assert worker_count(3) == 3 and worker_count(0) >= 1


def test_progress_is_reported_on_stderr_only(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_PROGRESS_SECONDS", "0")
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    blocks = list(line_blocks(corpus, block=4096))
    out = b"".join(Executor(1).map(_upper, blocks, "x", label="probe", records=lambda r: r.count(b"\n")))
    assert out.count(b"\n") == 3000
    lines = err.getvalue().splitlines()
    assert len(lines) == len(blocks) and lines[-1].startswith("probe: 3,000 records") and "100% of" in lines[-1]
