"""The protocol adapters over the serving core: `app.create_app` builds the service; `http` is our
own API (/classify, /embed, /models, probes, metrics), `oip_http` and `oip_grpc` the Open
Inference Protocol over HTTP and gRPC (both through the neutral request of `oip_codec`),
`repository_http` the repository extension; `auth` (tokens), `bodies` (request bodies),
`disconnect`, `http_errors` and `http_tracing` are the HTTP plumbing. Only this layer imports
FastAPI, Starlette, uvicorn or grpc.
"""
