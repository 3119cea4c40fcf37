"""Decoding and CPU inference take turns on the cores instead of fighting over them.

When onnxruntime runs on the CPU with one thread per core, an image decoded at the same time
does not come for free: it preempts one of the inference threads, and the others wait for it at
the end of each parallel operator. So on CPU the data plane alternates: images are decoded (on
every core, in parallel) while no batch runs, and a batch runs once the decoding admitted before
it has finished; batches run one at a time, also across models, each on every core. A batch
waiting for its turn blocks new decoding, so a steady stream of requests cannot starve
inference; decoding that was already waiting when a batch ended goes before the next batch, so
inference cannot starve decoding either.

Measured on the 2-core Xeon CI machine, ResNet-50 fp32 at concurrency 32 (`bench http`): with
decoding overlapped a batch costs 30.3 ms per image, taking turns 26.4 ms.

On CUDA the batch runs on the device and the host cores are free: there the gate is off and
decoding overlaps inference (`Settings.overlap_decoding`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class CpuGate:
    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._decoding = 0  # requests whose images are being decoded now
        self._running = 0  # batches running now (0 or 1)
        self._pending = 0  # batches waiting for their turn
        self._turn = 0  # counts finished batches
        self._waiting: Counter[int] = Counter()  # waiting decoders, by the turn they came in

    @asynccontextmanager
    async def decoding(self) -> AsyncIterator[None]:
        """Held by a request while its images are decoded."""
        async with self._condition:
            turn = self._turn
            self._waiting[turn] += 1
            try:
                await self._condition.wait_for(
                    lambda: self._running == 0 and (self._pending == 0 or self._turn > turn)
                )
            finally:
                self._waiting[turn] -= 1
                if not self._waiting[turn]:
                    del self._waiting[turn]
            self._decoding += 1
        try:
            yield
        finally:
            async with self._condition:
                self._decoding -= 1
                self._condition.notify_all()

    @asynccontextmanager
    async def inference(self) -> AsyncIterator[None]:
        """Held while a batch runs on the CPU; one batch at a time, across models."""
        async with self._condition:
            self._pending += 1
            try:
                await self._condition.wait_for(self._inference_may_start)
            finally:
                self._pending -= 1
            self._running += 1
        try:
            yield
        finally:
            async with self._condition:
                self._running -= 1
                self._turn += 1
                self._condition.notify_all()

    def _inference_may_start(self) -> bool:
        # Decoders that were already waiting when the last batch ended go first.
        entitled = any(turn < self._turn for turn in self._waiting)
        return self._running == 0 and self._decoding == 0 and not entitled
