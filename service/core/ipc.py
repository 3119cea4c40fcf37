"""The wire between the front-end workers and the engine process (`--workers N`, N >= 2).

Each worker has one stream socket to the engine process (a socketpair made when it is spawned)
and one shared-memory arena (a memfd the engine process made for it and maps too). Tensors never
travel on the socket: a worker writes a request's images into its arena and names their offset;
the engine process's batcher reads them from there and writes the outputs back into the same
arena; the socket carries only short messages, each framed as

    u32 length of what follows | u8 kind | payload

Requests (worker -> engine), one request id per inference request of the worker:

    ADMIT    id, images, version, flags, model name     room in the model's queue, or FAILED
    RUN      id, images, input offset, output offset    its images are in the arena: batch them
    CANCEL   id                                         its client left or it timed out
    CONTROL  id, JSON                                   repository index, load, unload
    READY                                               the worker serves its ports now

Answers (engine -> worker): exactly one DONE or FAILED per ADMIT, however the request ends, so
a worker frees an arena region only once the engine process can no longer write into it; and
ADMITTED before it, once the images have room in the queue, which the worker waits for before it
decodes anything (a request refused for a full queue costs no decoding, as with one process).
A worker with few images in flight decodes at once instead (`decoding_allowance`: the DECODING
flag, no ADMITTED), into room the engine process keeps for that, saving a round trip at low load:

    ADMITTED   id
    DONE       id, the batches that ran it (for tracing)
    FAILED     id, Retry-After, error code, message
    CONTROLLED id, JSON
    STATE      JSON: the models served, their versions, states and views, readiness

Messages are queued per connection and written once per event-loop iteration, so a request's
ADMIT and RUN (images decoded on the loop) and many requests' answers share one send under load.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Message kinds. HELLO: the engine process's first message to a worker, its settings.
HELLO = 0
ADMIT, RUN, CANCEL, CONTROL, READY = 1, 2, 3, 4, 5
DONE, FAILED, CONTROLLED, STATE, ADMITTED = 11, 12, 13, 14, 15

_FRAME = struct.Struct("<IB")
ADMIT_HEAD = struct.Struct("<IIIB")  # id, images, version, flags; then the model's name
TRACED, DECODING = 1, 2  # ADMIT flags: the request is traced; its images are being decoded
RUN_BODY = struct.Struct("<IIQQ")  # id, images, input offset, output offset
ID = struct.Struct("<I")
FAILED_HEAD = struct.Struct("<Ii")  # id, Retry-After (-1: none); then code \0 message
RUN_RECORD = struct.Struct("<ddddI")  # enqueued, batch start, inference start, end, batch size
MAX_FRAME = 16 * 2**20  # a STATE with many models' metadata fits; anything longer is a bug

ALIGN = 64  # arena regions start on cache lines


MessageHandler = Callable[[int, bytes], None]


def frame(kind: int, payload: bytes) -> bytes:
    """One message as it travels."""
    return _FRAME.pack(len(payload) + 1, kind) + payload


def read_frame(sock: Any) -> tuple[int, bytes]:
    """One message read from a blocking socket (a worker's first, before its event loop)."""
    head = _read_exactly(sock, _FRAME.size)
    length, kind = _FRAME.unpack(head)
    return kind, _read_exactly(sock, length - 1)


def _read_exactly(sock: Any, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("the engine process closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Channel(asyncio.Protocol):
    """Framed messages over one stream socket: `send(kind, payload)` queues, one write per
    event-loop iteration; every complete frame received goes to `on_message(kind, payload)`;
    `on_closed()` when the other side has gone."""

    def __init__(self, on_message: MessageHandler, on_closed: Callable[[], None]) -> None:
        self._on_message, self._on_closed = on_message, on_closed
        self._transport: Any = None  # an asyncio.Transport, or uvloop's own
        self._received = bytearray()
        self._pending: list[bytes] = []
        self._scheduled = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def send(self, kind: int, payload: bytes = b"") -> None:
        if self._transport is None or self._transport.is_closing():
            return  # the other side is gone; its requests were failed there
        self._pending.append(_FRAME.pack(len(payload) + 1, kind))
        self._pending.append(payload)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._pending))
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        buffer = self._received
        buffer += data
        start, end = 0, len(buffer)
        while end - start >= _FRAME.size:
            length, kind = _FRAME.unpack_from(buffer, start)
            if length > MAX_FRAME or length < 1:
                log.error("ipc: a frame of %d bytes: closing the connection", length)
                self.close()
                return
            if end - start < 4 + length:
                break
            payload = bytes(buffer[start + _FRAME.size : start + 4 + length])
            start += 4 + length
            try:
                self._on_message(kind, payload)
            except Exception:
                log.exception("ipc: message of kind %d could not be handled", kind)
        del buffer[:start]

    def close(self) -> None:
        self.flush()
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pending.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_closed()


async def open_channel(
    sock: Any, on_message: MessageHandler, on_closed: Callable[[], None]
) -> Channel:
    """A Channel over a connected stream socket (one end of a socketpair)."""
    loop = asyncio.get_running_loop()
    _, channel = await loop.connect_accepted_socket(
        lambda: Channel(on_message, on_closed), sock=sock
    )
    return channel


# -- message bodies -------------------------------------------------------------------------


def pack_admit(request: int, images: int, version: int, flags: int, name: str) -> bytes:
    return ADMIT_HEAD.pack(request, images, version, flags) + name.encode()


def unpack_admit(payload: bytes) -> tuple[int, int, int, int, str]:
    request, images, version, flags = ADMIT_HEAD.unpack_from(payload)
    return request, images, version, flags, payload[ADMIT_HEAD.size :].decode()


def decoding_allowance(settings: Any) -> int:
    """Images a worker may decode before its engine process has admitted them (ADMIT with the
    DECODING flag): while its admitted-and-unanswered images stay within this, its requests skip
    the wait for ADMITTED. The engine process keeps `workers` times this much of every queue for
    such images (other requests are refused that much earlier), so they are never refused for a
    full queue: a request refused for a full queue still costs no decoding."""
    return int(min(settings.max_batch_size, settings.max_queue_images // (2 * settings.workers)))


def pack_failed(request: int, retry_after_s: int | None, code: str, message: str) -> bytes:
    head = FAILED_HEAD.pack(request, -1 if retry_after_s is None else retry_after_s)
    return head + code.encode() + b"\0" + message.encode()


def unpack_failed(payload: bytes) -> tuple[int, int | None, str, str]:
    request, retry_after = FAILED_HEAD.unpack_from(payload)
    code, _, message = payload[FAILED_HEAD.size :].partition(b"\0")
    return (
        request,
        None if retry_after < 0 else retry_after,
        code.decode(),
        message.decode(errors="replace"),
    )


def pack_done(request: int, runs: list[tuple[float, float, float, float, int]] | None) -> bytes:
    if not runs:
        return ID.pack(request)
    return ID.pack(request) + b"".join(RUN_RECORD.pack(*run) for run in runs)


def unpack_done(payload: bytes) -> tuple[int, list[tuple[float, float, float, float, int]]]:
    (request,) = ID.unpack_from(payload)
    runs = list(RUN_RECORD.iter_unpack(payload[ID.size :])) if len(payload) > ID.size else []
    return request, runs


def pack_json(request: int, value: Any) -> bytes:
    return ID.pack(request) + json.dumps(value, separators=(",", ":")).encode()


def unpack_json(payload: bytes) -> tuple[int, Any]:
    (request,) = ID.unpack_from(payload)
    return request, json.loads(payload[ID.size :])


# -- shared memory -----------------------------------------------------------------------------


def shared_memory(size: int, name: str) -> int:
    """A file descriptor of `size` bytes of anonymous shared memory (pages are only taken when
    written), inheritable by a child given it in pass_fds."""
    fd = os.memfd_create(name, 0)  # Linux; the only platform --workers > 1 runs on
    os.ftruncate(fd, size)
    return fd


def map_shared(fd: int) -> mmap.mmap:
    return mmap.mmap(fd, os.fstat(fd).st_size)


def aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


class Arena:
    """First-fit allocation of regions of a worker's shared memory (used by the worker alone;
    the engine process only reads and writes the regions it is named). Regions freed are merged
    with their free neighbours."""

    def __init__(self, memory: mmap.mmap) -> None:
        self.memory = memory
        self.size = len(memory)
        self._free_starts = [0]  # sorted
        self._free_sizes = {0: self.size}
        self._used: dict[int, int] = {}

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    def alloc(self, size: int) -> int | None:
        """The offset of a region of `size` bytes, or None when no free region is that large."""
        size = aligned(max(size, 1))
        for index, start in enumerate(self._free_starts):
            available = self._free_sizes[start]
            if available >= size:
                del self._free_sizes[start]
                if available == size:
                    del self._free_starts[index]
                else:
                    self._free_starts[index] = start + size
                    self._free_sizes[start + size] = available - size
                self._used[start] = size
                return start
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        index = bisect.bisect_left(self._free_starts, offset)
        # merge with the next free region
        if index < len(self._free_starts) and self._free_starts[index] == offset + size:
            size += self._free_sizes.pop(self._free_starts[index])
            del self._free_starts[index]
        # merge with the previous free region
        if index > 0:
            before = self._free_starts[index - 1]
            if before + self._free_sizes[before] == offset:
                self._free_sizes[before] += size
                return
        self._free_starts.insert(index, offset)
        self._free_sizes[offset] = size

    def array(self, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        return view(self.memory, offset, shape)


def view(memory: mmap.mmap, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 [shape] at `offset` of `memory` (no copy); ValueError when it does not fit."""
    count = math.prod(shape)
    if offset < 0 or offset % 4 or offset + 4 * count > len(memory):
        raise ValueError(f"{shape} at offset {offset} is outside the shared memory")
    return np.frombuffer(memory, dtype=np.float32, count=count, offset=offset).reshape(shape)


class StatusBoard:
    """The engine process's queue depths, one int64 per slot, in shared memory the workers map:
    how a worker refuses a request whose model's queue is full before reading its body, without
    asking. Slot numbers are handed out with the models in STATE."""

    SLOTS = 1024

    def __init__(self, memory: mmap.mmap) -> None:
        self.memory = memory
        self.values = np.frombuffer(memory, dtype=np.int64, count=self.SLOTS)
        self._free = list(range(self.SLOTS - 1, -1, -1))

    @classmethod
    def size(cls) -> int:
        return cls.SLOTS * 8

    def take(self) -> int | None:
        """A free slot (the engine process's side), zeroed; None when all are taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self.values[slot] = 0
        return slot

    def give_back(self, slot: int) -> None:
        self.values[slot] = 0
        self._free.append(slot)

    def __getitem__(self, slot: int) -> int:
        return int(self.values[slot])

    def __setitem__(self, slot: int, value: int) -> None:
        self.values[slot] = value
