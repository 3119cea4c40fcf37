# resnet-serve images, one Dockerfile, two targets:
#   serve   the HTTP service without torch: onnxruntime-gpu with the CUDA 13 runtime wheels of its
#           [cuda,cudnn] extras (the host needs only the NVIDIA driver and container toolkit), or
#           onnxruntime for CPU-only hosts with --build-arg RUNTIME=cpu
#   export  one-shot job: exports a preset into a model repository (CPU PyTorch + ONNX toolchain)
#
#   docker build --target serve -t resnet-serve:gpu .
#   docker build --target serve --build-arg RUNTIME=cpu -t resnet-serve:cpu .
#   docker build --target export -t resnet-serve:export .
#
# `serve` comes first: the legacy builder (no BuildKit) builds every stage before its target, so
# `--target serve` never needs the PyTorch index.
# Dependencies come from pyproject.toml (docker/requirements.py), every version pinned by
# docker/constraints.txt, in layers built before any source is copied.
# Build arguments for hosts with no registry or behind a TLS-intercepting proxy (README,
# "Air-gapped builds"; docker/build-airgapped.sh does all of it): PYTHON_IMAGE (any Debian-based
# image with python3 first on PATH), TORCH_INDEX_URL (a local wheelhouse), and CA certificates
# placed in docker/ca-certificates/*.crt, which every stage trusts (pip and the export's
# downloads).

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
LABEL org.opencontainers.image.title="resnet-serve" \
      org.opencontainers.image.description="ResNet image classification: ONNX export and onnxruntime serving" \
      org.opencontainers.image.licenses="BSD-2-Clause"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY docker/ca-certificates/ /tmp/extra-ca/
# Extra CAs (docker/ca-certificates/*.crt, none by default) join the system bundle.
RUN if ls /tmp/extra-ca/*.crt >/dev/null 2>&1; then \
        cp /tmp/extra-ca/*.crt /usr/local/share/ca-certificates/ && update-ca-certificates >/dev/null; \
    fi \
    && rm -rf /tmp/extra-ca
# /models belongs to the unprivileged user so that an empty named volume mounted there
# starts out writable by the export job.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/app app \
    && mkdir /models /weights \
    && chown app:app /models
WORKDIR /app
COPY docker/constraints.txt docker/

# Each image's requirements, read from pyproject.toml: the install layers below depend on these
# lists' content only, so an edit elsewhere in pyproject.toml rebuilds nothing.
FROM base AS requirements
COPY pyproject.toml ./
COPY docker/requirements.py docker/
RUN python docker/requirements.py gpu grpc tracing > serve-gpu.txt \
    && python docker/requirements.py cpu openvino grpc tracing > serve-cpu.txt \
    && python docker/requirements.py cpu openvino export > export.txt

FROM base AS serve
# gpu: onnxruntime-gpu[cuda,cudnn] (CUDA 13 runtime, cuBLAS, cuDNN as pip wheels);
# cpu: onnxruntime. Both with the gRPC protocol (port 8001) and OpenTelemetry tracing. The
# build fails if torch slipped in through some dependency.
ARG RUNTIME=gpu
RUN case "${RUNTIME}" in gpu|cpu) ;; *) echo "RUNTIME must be gpu or cpu" >&2; exit 1 ;; esac
COPY --from=requirements /app/serve-${RUNTIME}.txt /tmp/requirements.txt
RUN pip install -c docker/constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
# The serving layers only (README "Architecture"): no torch code, not even the model classes.
COPY contract/ contract/
COPY runtime/ runtime/
COPY service/ service/
COPY docker/serve-entrypoint.sh docker/healthcheck.py docker/
# What the NVIDIA container toolkit mounts into the container: CUDA compute and nvidia-smi.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RESNET_SERVE_MODEL_REPOSITORY=/models \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000
USER 10001:10001
EXPOSE 8000 8001
# A 2 s interval: healthy within 2 s of ready (start_interval needs Engine >= 25); the probe
# is a bare interpreter (-I -S: no site-packages), about 10 ms of CPU.
HEALTHCHECK --interval=2s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-I", "-S", "/app/docker/healthcheck.py", "/readyz"]
ENTRYPOINT ["/app/docker/serve-entrypoint.sh"]

FROM base AS export
# The CPU build of PyTorch is enough to export (and about 3 GB smaller than the CUDA build);
# the parity gate runs onnxruntime on CPU.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c docker/constraints.txt \
        "torch==2.13.0+cpu" \
    || { echo "cannot install torch==2.13.0+cpu from TORCH_INDEX_URL=${TORCH_INDEX_URL}: pass" \
              "--build-arg TORCH_INDEX_URL=<an index that has it> (README: Air-gapped builds)" >&2; \
         exit 1; }
COPY --from=requirements /app/export.txt /tmp/requirements.txt
RUN pip install -c docker/constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY contract/ contract/
COPY runtime/ runtime/
COPY models/ models/
COPY export/ export/
COPY docker/export-entrypoint.sh docker/
ENV RESNET_SERVE_MODEL_REPOSITORY=/models \
    EXPORT_PRESET=paper \
    EXPORT_WEIGHTS_DIR=/weights
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["/app/docker/export-entrypoint.sh"]
