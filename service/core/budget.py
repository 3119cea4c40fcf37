"""Bytes of request bodies in memory at once, across every request of the process: a body that
would not fit is refused (503 with Retry-After) before any of it is read, so that many large
uploads at once cannot take the process past its memory limit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Gauge

from .errors import UnavailableError


class BodiesInFlightError(UnavailableError):
    code = "too_many_bytes_in_flight"


class ByteBudget:
    def __init__(self, limit: int, *, retry_after_s: int, gauge: Gauge) -> None:
        self.limit, self.used = limit, 0
        self._retry_after_s, self._gauge = retry_after_s, gauge

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Room for `size` bytes until the block ends, or BodiesInFlightError now."""
        if self.used + size > self.limit:
            raise BodiesInFlightError(
                f"{self.used} bytes of request bodies in memory; {size} more would exceed "
                f"max_inflight_bytes={self.limit}",
                retry_after_s=self._retry_after_s,
            )
        self.used += size
        self._gauge.set(self.used)
        try:
            yield
        finally:
            self.used -= size
            self._gauge.set(self.used)
