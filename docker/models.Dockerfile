# The serving image with an exported model repository baked in at /models: what each Swarm
# replica runs (docker-compose.swarm.yml), so that every node gets the models with the image.
# Built by docker/models-image.sh, whose build context is the exported repository.
ARG SERVE_IMAGE=resnet-serve:cpu
FROM ${SERVE_IMAGE}
LABEL org.opencontainers.image.title="resnet-serve-models" \
      org.opencontainers.image.description="resnet-serve with its exported model repository at /models" \
      org.opencontainers.image.licenses="BSD-2-Clause"
COPY --chown=10001:10001 . /models/
