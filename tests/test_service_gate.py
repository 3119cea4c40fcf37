"""The CPU gate: decoding and inference take turns, and neither can starve the other."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from service.cpu_gate import CpuGate

from .service_helpers import make_batcher


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout=10))


class Holder:
    """Enters one of the gate's sections in a task and stays until released."""

    def __init__(self, gate: CpuGate, section: str, log: list[str], name: str) -> None:
        self.inside, self.leave = asyncio.Event(), asyncio.Event()
        self.task = asyncio.create_task(self._hold(gate, section, log, name))

    async def _hold(self, gate: CpuGate, section: str, log: list[str], name: str) -> None:
        context = gate.decoding() if section == "decode" else gate.inference()
        async with context:
            log.append(f"{name} in")
            self.inside.set()
            await self.leave.wait()
            log.append(f"{name} out")

    async def release(self) -> None:
        self.leave.set()
        await self.task


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_decoding_waits_while_a_batch_runs() -> None:
    async def main() -> None:
        gate, log = CpuGate(), []
        batch = Holder(gate, "infer", log, "batch")
        await batch.inside.wait()
        decode = Holder(gate, "decode", log, "decode")
        await settle()
        assert not decode.inside.is_set()
        await batch.release()
        await decode.inside.wait()
        await decode.release()
        assert log == ["batch in", "batch out", "decode in", "decode out"]

    run(main)


def test_a_waiting_batch_lets_running_decoding_finish_and_holds_back_new_decoding() -> None:
    async def main() -> None:
        gate, log = CpuGate(), []
        first = Holder(gate, "decode", log, "first")
        await first.inside.wait()
        batch = Holder(gate, "infer", log, "batch")
        await settle()
        late = Holder(gate, "decode", log, "late")
        await settle()
        assert not batch.inside.is_set() and not late.inside.is_set()
        await first.release()
        await batch.inside.wait()
        await settle()
        assert not late.inside.is_set()  # a steady stream of requests cannot starve inference
        await batch.release()
        await late.release()
        assert log == ["first in", "first out", "batch in", "batch out", "late in", "late out"]

    run(main)


def test_decoding_that_waited_for_a_batch_goes_before_the_next_batch() -> None:
    async def main() -> None:
        gate, log = CpuGate(), []
        first = Holder(gate, "infer", log, "batch1")
        await first.inside.wait()
        decode = Holder(gate, "decode", log, "decode")
        await settle()
        second = Holder(gate, "infer", log, "batch2")  # queued behind the first batch
        await settle()
        await first.release()
        await decode.inside.wait()  # inference cannot starve decoding either
        await settle()
        assert not second.inside.is_set()
        await decode.release()
        await second.release()
        assert log == [
            "batch1 in", "batch1 out", "decode in", "decode out", "batch2 in", "batch2 out"
        ]  # fmt: skip

    run(main)


def test_a_cancelled_waiter_leaves_the_gate_usable() -> None:
    async def main() -> None:
        gate, log = CpuGate(), []
        decode = Holder(gate, "decode", log, "decode")
        await decode.inside.wait()
        batch = Holder(gate, "infer", log, "batch")
        await settle()
        batch.task.cancel()  # e.g. shutdown while the batch waited for its turn
        await asyncio.gather(batch.task, return_exceptions=True)
        await decode.release()
        again = Holder(gate, "decode", log, "again")
        await again.inside.wait()
        await again.release()
        assert log == ["decode in", "decode out", "again in", "again out"]

    run(main)


def test_images_queued_while_a_batch_waited_for_its_turn_join_it() -> None:
    sizes: list[int] = []

    def infer(batch: np.ndarray) -> list[np.ndarray]:
        sizes.append(len(batch))
        time.sleep(0.01)
        return [batch * 2]

    async def main() -> None:
        gate, log = CpuGate(), []
        batcher = make_batcher(infer, max_delay_ms=1, gate=gate)
        batcher.start()
        decoding = Holder(gate, "decode", log, "decode")
        await decoding.inside.wait()
        first = asyncio.create_task(batcher.submit(np.ones((1, 2), np.float32)))
        await asyncio.sleep(0.05)  # its batch closed after 1 ms and waits for the decoding
        rest = [
            asyncio.create_task(batcher.submit(np.full((1, 2), i, np.float32))) for i in range(4)
        ]
        await settle()
        assert sizes == []
        await decoding.release()
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        assert [float(r[0][0][0]) for r in results] == [2.0, 0.0, 2.0, 4.0, 6.0]
        assert sizes == [4, 1]  # topped up to max_batch_size, the rest in the next batch

    run(main)
