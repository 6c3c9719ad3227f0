# syntax=docker/dockerfile:1
# stageformer's serving image: ONNX Runtime behind FastAPI and uvicorn. No torch in it.
#
#   docker build -t stageformer .                              NVIDIA GPUs (CUDA + cuDNN base): the default
#   docker build --build-arg FLAVOR=cpu -t stageformer:cpu .   CPU only (slim Python base, plain onnxruntime)
#   docker run --gpus all -p 8000:8000 stageformer             serves the demo digits model at once
#   docker run --gpus all -p 8000:8000 -p 8001:8001 stageformer   also the Open Inference Protocol over gRPC
#
# Ports: 8000 HTTP (REST, the Open Inference Protocol, /metrics, the health routes the HEALTHCHECK asks),
# 8001 gRPC (inference.GRPCInferenceService, as Triton serves it; STAGEFORMER_GRPC_PORT=0 turns it off).
# Models: every *.onnx file and Triton-style NAME/1/model.onnx under /models. The image holds the demo model
# there; mount a folder over /models to serve yours (-v "$PWD/models:/models:ro"), or bake models in with
# --build-arg MODELS=<file or folder in the build context> (see .dockerignore: put them under models/).
# Settings: STAGEFORMER_* environment variables, or flags after the image name (they go to `stageformer serve`).

# GPU or CPU image.
ARG FLAVOR=gpu
# onnxruntime-gpu 1.31 from PyPI links CUDA 13 (libcudart.so.13, libcublas.so.13) and cuDNN 9.
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
# Any Debian-like image with Python >= 3.11 and its venv module.
ARG CPU_BASE_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------- bases: an OS with Python 3 and venv
FROM ${CUDA_BASE_IMAGE} AS base-gpu
# The CUDA image brings no Python: take the distribution's (3.12 on Ubuntu 24.04). Its version follows the
# pinned base image's release, so the packages are not pinned again (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV STAGEFORMER_DEVICE=auto

FROM ${CPU_BASE_IMAGE} AS base-cpu
ENV STAGEFORMER_DEVICE=cpu

# base-gpu or base-cpu: a stage of this file, not an image to pin (DL3006). Podman before 4.4 (buildah
# before 1.29) ignores ARG defaults here: pass --build-arg FLAVOR=gpu explicitly there.
# hadolint ignore=DL3006
FROM base-${FLAVOR} AS base
ARG UID=10001
RUN groupadd --system --gid "${UID}" stageformer \
    && useradd --system --uid "${UID}" --gid "${UID}" --create-home --home-dir /home/stageformer \
        --shell /usr/sbin/nologin stageformer

# ---------------------------------------------------------------- build: /opt/venv with the dependencies
FROM base AS build
ARG FLAVOR
ARG ONNXRUNTIME_VERSION=1.31.1
ARG DUMB_INIT_VERSION=1.2.5.post1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# pip lives in its own environment: the served one (/opt/venv) carries no installer.
RUN python3 -m venv /opt/pip && python3 -m venv --without-pip /opt/venv
# Dependencies first, from pyproject.toml alone: this layer survives code changes.
COPY pyproject.toml deploy/docker/requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    case "${FLAVOR}" in \
        gpu) extra=gpu; runtime=onnxruntime-gpu ;; \
        cpu) extra=serve; runtime=onnxruntime ;; \
        *) echo "FLAVOR must be gpu or cpu, not '${FLAVOR}'" >&2; exit 1 ;; \
    esac \
    && python3 requirements.py pyproject.toml "${extra}" > requirements.txt \
    && /opt/pip/bin/pip --python /opt/venv/bin/python install --disable-pip-version-check -r requirements.txt \
        "${runtime}==${ONNXRUNTIME_VERSION}" "dumb-init==${DUMB_INIT_VERSION}"
RUN if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the image" >&2; exit 1; fi

# ---------------------------------------------------------------- project: the package, in its own layer
FROM build AS project
# A regular (non-editable) wheel built from the build context, installed under /opt/project with the
# venv's layout, so the image adds it on top of the cached dependency layer.
COPY README.md ./
COPY model ./model
COPY export ./export
COPY service ./service
COPY stageformer ./stageformer
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/pip/bin/pip --python /opt/venv/bin/python install --disable-pip-version-check --no-deps \
        --prefix /opt/project .

# ---------------------------------------------------------------- the image
FROM base AS serve
ARG UID=10001
ARG MODELS=service/demo/digits.onnx
LABEL org.opencontainers.image.title="stageformer" \
      org.opencontainers.image.description="Image classification with hierarchical vision transformers on ONNX Runtime" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
COPY --from=project /opt/project/ /opt/venv/
COPY deploy/docker/healthcheck.py /opt/stageformer/healthcheck.py
COPY ${MODELS} /models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STAGEFORMER_HOST=0.0.0.0 \
    STAGEFORMER_PORT=8000 \
    STAGEFORMER_GRPC_PORT=8001 \
    STAGEFORMER_MODELS='["/models"]' \
    STAGEFORMER_TRT_CACHE_DIR=/home/stageformer/trt-cache
USER ${UID}:${UID}
WORKDIR /home/stageformer
EXPOSE 8000 8001
# Ready = every model loaded and warmed up. Loading large models on a GPU can take a while: start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/stageformer/healthcheck.py"]
# dumb-init runs as PID 1: it forwards SIGTERM to the server, which drains its queues and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dumb-init", "--", "stageformer", "serve"]
CMD []
