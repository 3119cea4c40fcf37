"""What the exporter writes and the service reads, and nothing else: the model repository
(`repository`: `ModelMetadata`, atomic writes, the version scan), the preprocessing a model was
trained with (`preprocessing`), file digests (`hashing`), the facts about a CPU that decide which
precision runs fastest on it (`cpu`), and the serving defaults an export verifies (`defaults`).

The bottom layer: standard library and pydantic only. No torch, no onnxruntime, no web or RPC
framework (enforced by the import-linter contracts in pyproject.toml).
"""
