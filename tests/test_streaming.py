"""EagerBatcher: the first streamed chunk leaves at once, later ones in per-interval batches."""

from __future__ import annotations

import asyncio

import pytest

from cluster.serving.streaming import EagerBatcher


async def _tokens(n: int, gap_s: float, error: Exception | None = None):
    for i in range(n):
        await asyncio.sleep(gap_s)
        yield i
    if error:
        raise error


async def _collect(batcher: EagerBatcher) -> list[list[int]]:
    return [batch async for batch in batcher.stream()]


def test_first_chunk_alone_then_batches_and_nothing_lost() -> None:
    batches = asyncio.run(_collect(EagerBatcher(_tokens(30, 0.005), interval_s=0.05)))
    assert batches[0] == [0]  # not held back for an interval
    assert [t for b in batches for t in b] == list(range(30))
    assert len(batches) < 30  # the rest crossed in batches, not one hop per token


def test_engine_error_reaches_the_caller() -> None:
    with pytest.raises(ValueError, match="engine died"):
        asyncio.run(_collect(EagerBatcher(_tokens(3, 0.001, ValueError("engine died")), interval_s=0.01)))


def test_zero_interval_streams_every_chunk() -> None:
    batches = asyncio.run(_collect(EagerBatcher(_tokens(5, 0.002), interval_s=0)))
    assert [t for b in batches for t in b] == list(range(5))
