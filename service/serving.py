"""Before the split into `lifecycle` and `dataplane`: `open_entry` is still importable from
here for bench/engine.py, which imports it from this module."""

from .lifecycle import open_entry

__all__ = ["open_entry"]
