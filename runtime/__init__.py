"""What runs a model, free of HTTP and RPC: the engines behind one protocol (`runtime.engines`),
image bytes to model input written into caller-owned buffers (`preprocess`, and `gpu_decode` for
JPEGs on the GPU), and image directories (`image_files`). Imports the `contract` and nothing of
the service: the exporter's gates run the same engines and preprocessing as serving does.
"""
