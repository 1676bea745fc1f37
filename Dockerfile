# syntax=docker/dockerfile:1
# imagegen images. Targets:
#   cuda (default, last): the official PyTorch CUDA runtime image, for GPU hosts
#   cpu:                  Python slim with the CPU build of torch (docker build --target cpu .)
# Build arg EXTRAS=ray adds the Ray backends (the compose "ray" profile sets it).

ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# -- dependencies: change rarely, so they come first ------------------------------------------
FROM ${CPU_BASE} AS cpu-deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU wheel is pinned before anything can ask for torch: a looser spec pulls a CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /opt/imagegen
COPY pyproject.toml README.md deploy/install-deps.sh ./
RUN ./install-deps.sh "${EXTRAS}"

FROM ${CUDA_BASE} AS cuda-deps
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/imagegen
COPY pyproject.toml README.md deploy/install-deps.sh ./
# The base image's torch satisfies pyproject's range, so pip keeps it.
RUN ./install-deps.sh "${EXTRAS}"

# -- the application: our four packages and the built-in tiny models ---------------------------
FROM cpu-deps AS cpu
COPY server server
COPY engine engine
COPY executors executors
COPY workers workers
COPY deploy/install-app.sh ./
RUN ./install-app.sh
# Bind all interfaces inside the container; real models live on the /models volume.
ENV IMAGEGEN_HOST=0.0.0.0 IMAGEGEN_PORT=8000 IMAGEGEN_MODEL_CACHE_DIR=/opt/imagegen/builtin \
    HF_HOME=/models/huggingface HF_HUB_OFFLINE=1
VOLUME ["/models"]
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["imagegen", "serve"]

FROM cuda-deps AS cuda
COPY server server
COPY engine engine
COPY executors executors
COPY workers workers
COPY deploy/install-app.sh ./
RUN ./install-app.sh
ENV IMAGEGEN_HOST=0.0.0.0 IMAGEGEN_PORT=8000 IMAGEGEN_MODEL_CACHE_DIR=/opt/imagegen/builtin \
    HF_HOME=/models/huggingface HF_HUB_OFFLINE=1
VOLUME ["/models"]
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["imagegen", "serve"]
