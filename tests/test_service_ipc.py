"""The wire of `--workers N` (service/core/ipc.py), piece by piece: the arena's allocator, framed
messages over a real socketpair, the message bodies, the room kept for images being decoded."""

from __future__ import annotations

import asyncio
import itertools
import mmap
import random
import socket
from pathlib import Path

import numpy as np
import pytest

from service.core import ipc
from service.core.settings import Settings
from tests.support.graphs import write_tiny


def arena(size: int) -> ipc.Arena:
    return ipc.Arena(mmap.mmap(-1, size))


def test_the_arena_hands_out_aligned_disjoint_regions_and_merges_what_is_freed() -> None:
    memory = arena(1024)
    a, b, c = memory.alloc(100), memory.alloc(1), memory.alloc(64)
    assert (a, b, c) == (0, 128, 192)  # 64-byte aligned, first fit
    assert memory.alloc(1024) is None  # too large for what is left
    memory.free(b)
    assert memory.alloc(64) == 128  # the hole is reused
    memory.free(128)
    memory.free(a)
    memory.free(c)
    assert memory.used_bytes == 0
    assert memory.alloc(1024) == 0  # every free region merged back into one


def test_the_arena_never_overlaps_under_random_use() -> None:
    memory, rng, live = arena(64 * 1024), random.Random(0), {}
    for _ in range(5000):
        if live and rng.random() < 0.5:
            offset = rng.choice(list(live))
            memory.free(offset)
            del live[offset]
        else:
            size = rng.randint(1, 4000)
            offset = memory.alloc(size)
            if offset is not None:
                live[offset] = size
        spans = sorted((o, o + ipc.aligned(s)) for o, s in live.items())
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
        assert all(end <= memory.size for _, end in spans)


def test_views_are_bounds_checked() -> None:
    memory = mmap.mmap(-1, 4096)
    view = ipc.view(memory, 64, (2, 3, 4))
    view[...] = 1.5
    assert np.frombuffer(memory, dtype=np.float32, count=24, offset=64).sum() == 36.0
    for offset, shape in ((4000, (100,)), (-4, (1,)), (2, (1,))):
        with pytest.raises(ValueError, match="outside"):
            ipc.view(memory, offset, shape)


def test_messages_cross_a_socketpair_framed_whatever_the_chunking() -> None:
    sent = [
        (ipc.ADMIT, ipc.pack_admit(7, 3, 2, ipc.TRACED | ipc.DECODING, "cifar_resnet20")),
        (ipc.RUN, ipc.RUN_BODY.pack(7, 3, 128, 4096)),
        (ipc.FAILED, ipc.pack_failed(8, 1, "queue_full", "model m: full")),
        (ipc.DONE, ipc.pack_done(9, [(1.0, 2.0, 3.0, 4.0, 5)])),
        (ipc.STATE, ipc.pack_json(0, {"models": {}, "status": "ready"})),
        (ipc.CANCEL, b"x" * 200_000),  # larger than one read
    ]

    async def exchange() -> list[tuple[int, bytes]]:
        left, right = socket.socketpair()
        received: list[tuple[int, bytes]] = []
        done = asyncio.Event()

        def on_message(kind: int, payload: bytes) -> None:
            received.append((kind, payload))
            if len(received) == len(sent):
                done.set()

        receiver = await ipc.open_channel(right, on_message, lambda: None)
        writer = await ipc.open_channel(left, lambda *_: None, lambda: None)
        for kind, payload in sent:
            writer.send(kind, payload)
        await asyncio.wait_for(done.wait(), 10)
        writer.close()
        receiver.close()
        return received

    received = asyncio.run(exchange())
    assert received == sent
    assert ipc.unpack_admit(received[0][1]) == (7, 3, 2, 3, "cifar_resnet20")
    assert ipc.unpack_failed(received[2][1]) == (8, 1, "queue_full", "model m: full")
    assert ipc.unpack_done(received[3][1]) == (9, [(1.0, 2.0, 3.0, 4.0, 5)])
    assert ipc.unpack_json(received[4][1]) == (0, {"models": {}, "status": "ready"})


def test_a_worker_reads_its_first_message_before_its_event_loop() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(ipc.frame(ipc.HELLO, b"settings") + ipc.frame(ipc.STATE, b"{}"))
        assert ipc.read_frame(right) == (ipc.HELLO, b"settings")
        assert ipc.read_frame(right) == (ipc.STATE, b"{}")  # nothing of the next one was eaten


@pytest.mark.parametrize(
    ("queue", "batch", "workers", "allowance"),
    [(512, 32, 2, 32), (512, 32, 16, 16), (8, 2, 2, 2), (2, 2, 2, 0)],
)
def test_the_room_kept_for_decoding_is_at_most_half_the_queue(
    tmp_path: Path, queue: int, batch: int, workers: int, allowance: int
) -> None:
    repo = tmp_path / "repo"
    write_tiny(repo, "tiny")
    settings = Settings(
        model_repository=repo,
        max_queue_images=queue,
        max_batch_size=batch,
        max_images_per_request=min(queue, 64),
        workers=workers,
    )
    assert ipc.decoding_allowance(settings) == allowance
    assert workers * allowance <= queue // 2
