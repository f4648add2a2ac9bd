"""The one executor of the data stages: an ordered, deterministic map over planned blocks.

A stage plans its input as a list of blocks (core.line_blocks: whole lines of a file), hands the
executor a pure function of (state, block) and consumes the results in block order. Everything
order-dependent (dedup, ids, aggregates) stays with the consumer, so no output depends on the
worker count or on timing.

Made to be replaced by a multi-machine executor without touching stage logic (datatrove's model):
`rank`/`world_size` cut the planned blocks into contiguous shards, a rank maps only its own shard
and writes one output part, and the parts merged in rank order are the blocks' results in block
order (`merge_parts`). On one machine the world is one rank, and that rank fans its shard out to
`workers` forked processes.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from stages.core import atomic_open, progress

B = TypeVar("B")
R = TypeVar("R")

# The job of a forked worker: (function, state), set by the pool's initializer. One slot for the
# whole project, instead of a worker global in each stage module.
_JOB: tuple[Callable[[Any, Any], Any], Any] | None = None


def _init(fn: Callable[[Any, Any], Any], state: Any) -> None:
    global _JOB
    _JOB = (fn, state)


def _call(block: Any) -> Any:
    fn, state = _JOB  # type: ignore[misc]
    return fn(state, block)


def worker_count(setting: int) -> int:
    """A params `workers` setting: 0 means one process per core."""
    return setting or os.cpu_count() or 1


def shard(blocks: Sequence[B], rank: int, world_size: int) -> Sequence[B]:
    """This rank's contiguous share of the planned blocks (rank 0 first: concatenating the shards in
    rank order gives the blocks in order)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    n = len(blocks)
    return blocks[rank * n // world_size:(rank + 1) * n // world_size]


@dataclass(frozen=True)
class Executor:
    """`workers` local processes for rank `rank` of `world_size` ranks."""

    workers: int = 1
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_setting(cls, workers: int, rank: int = 0, world_size: int = 1) -> "Executor":
        return cls(worker_count(workers), rank, world_size)

    def map(self, fn: Callable[[Any, B], R], blocks: Sequence[B], state: Any = None, *, label: str | None = None,
            records: Callable[[R], int] | None = None, length_at: int = 2) -> Iterator[R]:
        """fn(state, block) for each block of this rank's shard, yielded in block order.

        `state` is built once by the caller and reaches forked workers by inheritance (never pickled).
        With `label`, progress goes to stderr (core.progress): `records(result)` records and the
        block's byte length (block[length_at]) per block.
        """
        mine = shard(blocks, self.rank, self.world_size)
        results = self._run(fn, mine, state)
        if label is not None:
            results = progress(results, mine, label, records or (lambda _r: 0), length_at=length_at)
        return results

    def _run(self, fn: Callable[[Any, B], R], blocks: Sequence[B], state: Any) -> Iterator[R]:
        if self.workers <= 1 or len(blocks) <= 1:
            # In this process: no fork, and the state is used as it is.
            for block in blocks:
                yield fn(state, block)
            return
        pool = get_context("fork").Pool(min(self.workers, len(blocks)), initializer=_init, initargs=(fn, state))
        try:
            yield from pool.imap(_call, blocks)  # imap: results in submission (= block) order
        finally:
            pool.terminate()


def merge_parts(parts: Iterable[str | os.PathLike], dest: str | os.PathLike) -> None:
    """Concatenate the ranks' output parts, in rank order, into `dest` (atomically)."""
    with atomic_open(dest) as out:
        for part in parts:
            with open(part, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 20)


def part_name(name: str, rank: int, world_size: int) -> str:
    """The file a rank writes for output `name`: the name itself in a world of one."""
    return name if world_size == 1 else f"{name}.part-{rank:05d}-of-{world_size:05d}"
