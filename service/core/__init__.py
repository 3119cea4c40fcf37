"""The serving core, free of HTTP and gRPC (no FastAPI, Starlette or grpc import): which models
are served and how requests reach them. `registry.ModelRegistry` loads, warms, swaps, retires
and drains models; `batcher.Batcher` batches one model's images; `dataplane.DataPlane` (given a
registry) runs one request; `model_control.ModelControl` updates models live. `errors`,
`settings`, `metrics`, `tracing` and `postprocess` serve all of them.
"""
