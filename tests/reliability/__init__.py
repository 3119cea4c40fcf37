"""Reliability suite: hostile input, overload, soak and faults against the real service. A test
suite, not installed with the product.

`python -m tests.reliability overload|soak|fuzz|faults|all --out DIR` (from the repository root)
starts `python -m service` on a free 127.0.0.1 port, drives it with bounded request counts and
time, and writes `results.json` and `results.md`; the fast subset of the same scenarios runs in
`tests/test_reliability_*.py`.
"""
