"""The serving process: `python -m service --model-repository REPO`.

Two layers, one direction: the serving core (`service.core`: the model registry, the batcher,
the data plane, post-processing, errors, settings, metrics, tracing, live model updates), which
knows no protocol, and the protocol adapters over it (`service.protocols`: our HTTP API, the Open
Inference Protocol over HTTP and gRPC, the repository extension, tokens, request bodies). Both
stand on `runtime` (engines, preprocessing) and `contract` (the model repository); none of it
imports torch.
"""
