"""The test harness, shared by the tests, the reliability suite (`tests/reliability`) and the
benchmark (`bench`, which imports it; never the other way round):

- `launcher`: `python -m service` in a subprocess on a free 127.0.0.1 port, its metrics and
  resources, and `poll_until`, the one polling loop;
- `wire`: a raw HTTP/1.1 client and the multipart encoder; `grpc_client`: ModelInfer payloads;
- `load`: the one load generator (closed and open loops, one tally of every request);
- `stats`: percentiles and summaries;
- `service`: helpers for in-process apps, tiny repositories and the command lines.
"""
