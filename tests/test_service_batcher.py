"""The batcher on its own: batch formation, deadlines, order, bounds, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from service.core.errors import InferenceError, NotReadyError, QueueFullError
from service.core.metrics import Metrics

from .support.service import make_batcher, submit


class Recorder:
    """An `infer` that doubles its input and records the batch sizes it saw."""

    def __init__(
        self,
        delay_s: float = 0.0,
        fail: Exception | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.sizes: list[int] = []
        self.delay_s, self.fail, self.gate = delay_s, fail, gate

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        self.sizes.append(len(batch))
        time.sleep(self.delay_s)
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        return [batch * 2, batch[:, :1]]


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop (and the inference thread) until `condition()` holds."""
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.001)


def images(*values: float) -> np.ndarray:
    return np.array([[v, v + 0.5] for v in values], dtype=np.float32)


def test_concurrent_requests_share_batches_and_get_their_own_results() -> None:
    infer = Recorder()

    async def main() -> None:
        batcher = make_batcher(infer)
        batcher.start()
        results = await asyncio.gather(*(submit(batcher, images(i)) for i in range(8)))
        await batcher.stop()
        for i, (doubled, first) in enumerate(results):  # one array per output, one row each
            np.testing.assert_array_equal(doubled, images(i) * 2)
            assert first.tolist() == [[i]]

    run(main)
    assert sum(infer.sizes) == 8
    assert max(infer.sizes) == 4  # closed at max_batch_size, never beyond


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


def test_a_lone_image_waits_at_most_the_delay() -> None:
    async def main() -> None:
        batcher = make_batcher(Recorder(), max_delay_ms=50)
        batcher.start()
        start = time.monotonic()
        await submit(batcher, images(1))
        elapsed = time.monotonic() - start
        await batcher.stop()
        assert 0.04 <= elapsed < 0.5

    run(main)


def test_full_queue_refuses_the_whole_request_with_retry_after() -> None:
    async def main() -> None:
        batcher = make_batcher(Recorder(), max_queue_images=6, max_batch_size=4, max_delay_ms=200)
        batcher.start()
        first = asyncio.create_task(submit(batcher, images(0, 1, 2)))
        await until(lambda: batcher.waiting == 3)  # forming a batch, which waits 200 ms
        with pytest.raises(QueueFullError) as refused:
            await submit(batcher, images(*range(4)))
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": "3"}
        assert len((await submit(batcher, images(3, 4, 5)))[0]) == 3  # fits exactly
        assert len((await first)[0]) == 3
        await batcher.stop()

    run(main)


def test_an_inference_error_fails_every_request_of_the_batch() -> None:
    async def main() -> None:
        batcher = make_batcher(Recorder(fail=RuntimeError("device lost")))
        batcher.start()
        results = await asyncio.gather(
            *(submit(batcher, images(i)) for i in range(3)), return_exceptions=True
        )
        await batcher.stop()
        assert all(isinstance(r, InferenceError) for r in results)
        assert "device lost" in str(results[0])
        assert isinstance(results[0].__cause__, RuntimeError)

    run(main)


def test_one_output_per_input_is_checked() -> None:
    async def main() -> None:
        batcher = make_batcher(lambda batch: [batch[:1]])
        batcher.start()
        with pytest.raises(InferenceError, match="outputs of sizes"):
            await submit(batcher, images(1, 2))
        await batcher.stop()

    run(main)


def test_abandoned_images_are_skipped() -> None:
    release = threading.Event()
    infer = Recorder(gate=release)

    async def main() -> None:
        batcher = make_batcher(infer, max_batch_size=1)
        batcher.start()
        busy = asyncio.create_task(submit(batcher, images(0)))
        await until(lambda: infer.sizes == [1])  # the first batch is running, held at the gate
        gone = asyncio.create_task(submit(batcher, images(1, 2, 3)))
        await until(lambda: batcher.waiting == 3)
        gone.cancel()  # its request gives up (a timeout, a disconnect) while its images wait
        release.set()
        await busy
        with pytest.raises(asyncio.CancelledError):
            await gone
        await batcher.stop()
        assert batcher.waiting == 0

    run(main)
    assert infer.sizes == [1]


def test_stop_finishes_queued_images_then_refuses_new_ones() -> None:
    infer = Recorder(delay_s=0.05)

    async def main() -> None:
        batcher = make_batcher(infer, max_batch_size=2)
        batcher.start()
        pending = [asyncio.create_task(submit(batcher, images(i))) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.stop()
        assert all(task.done() and not task.exception() for task in pending)
        with pytest.raises(NotReadyError):
            await submit(batcher, images(9))

    run(main)
    assert sum(infer.sizes) == 5


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
        jobs = [submit(a, images(1, 1)) for _ in range(5)] + [
            submit(b, images(2)) for _ in range(5)
        ]
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
