"""The batcher on its own: when a batch starts, what it takes, order, bounds, failures, shutdown.

No test measures time: an engine held at a gate (`Recorder(gate=...)`) makes "the engine is
busy" an event, and a long `max_delay_ms` against a short deadline tells whether a batch waited.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import numpy as np
import pytest

from service.core.batcher import Batcher
from service.core.errors import InferenceError, NotReadyError, QueueFullError
from service.core.metrics import Metrics

from .support.service import make_batcher, submit

NEVER_MS = 60_000  # a max_delay_ms no test may wait for: each test finishes within 30 s


class Recorder:
    """An `infer` that doubles its input and records the batch sizes it saw; with a `gate`,
    each batch waits at it until the test opens it."""

    def __init__(self, fail: Exception | None = None, gate: threading.Event | None = None) -> None:
        self.sizes: list[int] = []
        self.fail, self.gate = fail, gate

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        self.sizes.append(len(batch))
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        return [batch * 2, batch[:, :1]]


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await main()

    asyncio.run(bounded())


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop (and the inference thread) until `condition()` holds."""
    while not condition():
        await asyncio.sleep(0.001)


def images(*values: float) -> np.ndarray:
    return np.array([[v, v + 0.5] for v in values], dtype=np.float32)


def test_a_lone_image_runs_at_once_whatever_the_delay() -> None:
    infer = Recorder()

    async def main() -> None:
        batcher = make_batcher(infer, max_delay_ms=NEVER_MS)
        batcher.start()
        doubled, _ = await submit(batcher, images(1))  # no company is waited for
        np.testing.assert_array_equal(doubled, images(1) * 2)
        await batcher.stop()

    run(main)
    assert infer.sizes == [1]


def test_images_that_arrive_while_the_engine_is_busy_form_the_next_batch() -> None:
    gate = threading.Event()
    infer = Recorder(gate=gate)

    async def main() -> None:
        batcher = make_batcher(infer, max_batch_size=4, max_delay_ms=NEVER_MS)
        batcher.start()
        jobs = [asyncio.create_task(submit(batcher, images(0)))]
        await until(lambda: infer.sizes == [1])  # the first runs alone, held at the gate
        jobs += [asyncio.create_task(submit(batcher, images(i))) for i in range(1, 8)]
        await until(lambda: batcher.waiting == 7)
        gate.set()
        results = await asyncio.gather(*jobs)
        for i, (doubled, first) in enumerate(results):  # one array per output, one row each
            np.testing.assert_array_equal(doubled, images(i) * 2)
            assert first.tolist() == [[i]]
        await batcher.stop()

    run(main)
    assert infer.sizes == [1, 4, 3]  # closed at max_batch_size, never beyond


def test_a_batch_waits_for_images_already_on_their_way() -> None:
    """Admitted images still being decoded are worth waiting for, up to max_delay_ms."""
    infer = Recorder()

    async def main() -> None:
        batcher = make_batcher(infer, max_delay_ms=NEVER_MS)
        batcher.start()
        async with batcher.admit(1) as first, batcher.admit(1) as second:
            ran = asyncio.create_task(first.run(images(1)))
            await until(lambda: batcher.waiting == 2 and not infer.sizes)
            await second.run(images(2))  # arrives: the batch starts with both
            await ran
        await batcher.stop()

    run(main)
    assert infer.sizes == [2]


def test_a_batch_stops_waiting_when_the_images_on_their_way_are_given_up() -> None:
    infer = Recorder()

    async def main() -> None:
        batcher = make_batcher(infer, max_delay_ms=NEVER_MS)
        batcher.start()
        async with batcher.admit(1) as first:
            ran = asyncio.create_task(first.run(images(1)))
            async with batcher.admit(1):  # decoding it fails: the block ends without run
                await until(lambda: batcher.waiting == 2)
            await ran
        await batcher.stop()

    run(main)
    assert infer.sizes == [1]


def test_a_batch_waits_for_images_on_their_way_at_most_the_delay() -> None:
    infer = Recorder()

    async def main() -> None:
        batcher = make_batcher(infer, max_delay_ms=50)
        batcher.start()
        async with batcher.admit(1) as first, batcher.admit(1) as second:
            await first.run(images(1))  # the second never comes while the first waits
            assert infer.sizes == [1]
            await second.run(images(2))
        await batcher.stop()

    run(main)
    assert infer.sizes == [1, 1]


def test_a_request_larger_than_a_batch_keeps_its_order() -> None:
    infer = Recorder()

    async def main() -> None:
        batcher = make_batcher(infer)
        batcher.start()
        values = list(range(10))
        result = await submit(batcher, images(*values))
        await batcher.stop()
        assert result[1][:, 0].tolist() == values  # the request's rows, in order, as one array

    run(main)
    assert infer.sizes == [4, 4, 2]


def test_full_queue_refuses_the_whole_request_with_retry_after() -> None:
    gate = threading.Event()
    infer = Recorder(gate=gate)

    async def main() -> None:
        batcher = make_batcher(infer, max_queue_images=6, max_batch_size=4)
        batcher.start()
        busy = asyncio.create_task(submit(batcher, images(9)))
        await until(lambda: infer.sizes == [1])  # the engine is busy at the gate
        first = asyncio.create_task(submit(batcher, images(0, 1, 2)))
        await until(lambda: batcher.waiting == 3)
        with pytest.raises(QueueFullError) as refused:
            await submit(batcher, images(*range(4)))
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": "3"}
        third = asyncio.create_task(submit(batcher, images(3, 4, 5)))  # fits exactly
        await until(lambda: batcher.waiting == 6)
        gate.set()
        assert len((await first)[0]) == 3 and len((await third)[0]) == 3
        await busy
        await batcher.stop()

    run(main)


def test_admitted_room_counts_against_the_queue_until_the_ticket_ends() -> None:
    zeros = partial(np.zeros, dtype=np.float32)

    async def main() -> None:
        batcher = make_batcher(lambda batch: [batch], max_delay_ms=1, max_queue_images=4)
        batcher.start()
        async with batcher.admit(3) as ticket:
            await asyncio.sleep(0)  # awaits between admission and run cannot lose the room
            with pytest.raises(QueueFullError):
                await submit(batcher, zeros((2, 1)))
            (out,) = await ticket.run(zeros((1, 1)))  # uses 1 of its 3
            assert out.shape == (1, 1)
            with pytest.raises(QueueFullError):  # the 2 unused are still held
                await submit(batcher, zeros((3, 1)))
        assert len((await submit(batcher, zeros((4, 1))))[0]) == 4  # all of it came back
        assert batcher.waiting == 0
        await batcher.stop()

    run(main)


def test_an_inference_error_fails_every_request_of_the_batch() -> None:
    gate = threading.Event()
    infer = Recorder(fail=RuntimeError("device lost"), gate=gate)

    async def main() -> None:
        batcher = make_batcher(infer)
        batcher.start()
        jobs = [asyncio.create_task(submit(batcher, images(0)))]
        await until(lambda: infer.sizes == [1])  # the first batch runs, held at the gate
        jobs += [asyncio.create_task(submit(batcher, images(i))) for i in (1, 2)]
        await until(lambda: batcher.waiting == 2)
        gate.set()
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.stop()
        assert all(isinstance(r, InferenceError) for r in results)
        assert "device lost" not in str(results[0])  # the engine's text stays in the log
        assert isinstance(results[0].__cause__, RuntimeError)

    run(main)
    assert infer.sizes == [1, 2]


def test_one_output_per_input_is_checked() -> None:
    async def main() -> None:
        batcher = make_batcher(lambda batch: [batch[:1]])
        batcher.start()
        with pytest.raises(InferenceError, match="outputs of sizes"):
            await submit(batcher, images(1, 2))
        await batcher.stop()

    run(main)


def test_images_of_a_request_that_gave_up_never_run() -> None:
    gate = threading.Event()
    infer = Recorder(gate=gate)

    async def main() -> None:
        batcher = make_batcher(infer, max_batch_size=8, max_queue_images=8)
        batcher.start()
        busy = asyncio.create_task(submit(batcher, images(0)))
        await until(lambda: infer.sizes == [1])  # the first batch is running, held at the gate
        gone = asyncio.create_task(submit(batcher, images(7, 7)))
        stays = asyncio.create_task(submit(batcher, images(1)))
        await until(lambda: batcher.waiting == 3)
        gone.cancel()  # its request gives up (a timeout, a disconnect) while its images wait
        gate.set()
        await busy
        assert len((await stays)[0]) == 1
        with pytest.raises(asyncio.CancelledError):
            await gone
        await batcher.stop()
        assert batcher.waiting == 0

    run(main)
    assert infer.sizes == [1, 1]


def test_stop_finishes_queued_images_then_refuses_new_ones() -> None:
    gate = threading.Event()
    infer = Recorder(gate=gate)

    async def main() -> None:
        batcher = make_batcher(infer, max_batch_size=2)
        batcher.start()
        pending = [asyncio.create_task(submit(batcher, images(0)))]
        await until(lambda: infer.sizes == [1])  # the first batch runs, held at the gate
        pending += [asyncio.create_task(submit(batcher, images(i))) for i in range(1, 5)]
        await until(lambda: batcher.waiting == 4)
        stopping = asyncio.create_task(batcher.stop())
        gate.set()
        await stopping
        assert all(task.done() and not task.exception() for task in pending)
        with pytest.raises(NotReadyError):
            await submit(batcher, images(9))

    run(main)
    assert infer.sizes == [1, 2, 2]


def test_batches_never_mix_models() -> None:
    seen: dict[str, list[set[float]]] = {"a": [], "b": []}

    def infer_for(name: str) -> Callable[[np.ndarray], list[np.ndarray]]:
        def infer(batch: np.ndarray) -> list[np.ndarray]:
            seen[name].append(set(batch[:, 1].tolist()))
            return [batch]

        return infer

    async def main() -> None:
        a, b = make_batcher(infer_for("a")), make_batcher(infer_for("b"))
        a.start()
        b.start()
        jobs = [submit(a, images(1, 1)) for _ in range(5)]
        jobs += [submit(b, images(2)) for _ in range(5)]
        await asyncio.gather(*jobs)
        await asyncio.gather(a.stop(), b.stop())

    run(main)
    assert all(values == {1.5} for values in seen["a"])
    assert all(values == {2.5} for values in seen["b"])


def test_metrics_record_batches_and_queue() -> None:
    metrics = Metrics()

    async def main() -> None:
        batcher = make_batcher(Recorder(), metrics=metrics)
        batcher.start()
        await asyncio.gather(*(submit(batcher, images(i)) for i in range(4)))
        await batcher.stop()

    run(main)
    registry = metrics.registry
    assert registry.get_sample_value("resnet_serve_batch_size_images_sum", {"model": "m"}) == 4
    assert registry.get_sample_value("resnet_serve_queue_wait_seconds_count", {"model": "m"}) == 4
    assert registry.get_sample_value("resnet_serve_queue_depth_images", {"model": "m"}) == 0


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch_size <= max_queue_images"):
        Batcher("m", lambda b: [b], max_batch_size=8, max_delay_ms=1, max_queue_images=4,
                retry_after_s=1, metrics=Metrics())  # fmt: skip
