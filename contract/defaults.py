"""The service's batching defaults, which an export must agree with: the largest batch its
parity gate verifies is the largest batch the service forms by default, and the Triton
configuration it writes batches the same way."""

from __future__ import annotations

# Images per batch: the service's `max_batch_size` default and what an export verifies.
MAX_BATCH_SIZE = 32
# How long a batch may wait for more images while the engine is busy (the service's
# `max_delay_ms` default; Triton's `max_queue_delay_microseconds` in config.pbtxt).
MAX_DELAY_MS = 5.0
