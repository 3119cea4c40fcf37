"""Latency per depth: onnxruntime in process (`engine`) and the HTTP service under load (`http`).

`python -m bench engine|http --help`; results go to results.json, results.md and PNG plots.
"""
