# syntax=docker/dockerfile:1
#
# histo-robust inference image: ONNX Runtime + BentoML, no torch.
#
#   GPU (default): docker build -t histo-robust:gpu .
#   CPU only:      docker build --build-arg VARIANT=cpu -t histo-robust:cpu .
#
# Python dependencies come from pyproject.toml and nowhere else: `uv pip install -r pyproject.toml
# --extra gpu|serve` installs the project's core `dependencies` plus one extra, exactly as pinned
# there (tests/test_container.py checks that this file carries no second list of pins).

ARG VARIANT=gpu

# onnxruntime-gpu 1.31.1's libonnxruntime_providers_cuda.so has NEEDED entries for libcudart.so.13,
# libcublas.so.13, libcublasLt.so.13 and libcurand.so.10, and its CUDA EP needs cuDNN 9: a CUDA 13
# runtime image with cuDNN 9. A CUDA 13 image needs an NVIDIA driver >= 580 on the host.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS base-gpu
ENV HISTO_IMAGE_VARIANT=gpu \
    HISTO_IMAGE_EXTRA=gpu

# Same OS as the GPU image, without the CUDA libraries; installs the `serve` extra (CPU onnxruntime).
FROM ubuntu:24.04 AS base-cpu
ENV HISTO_IMAGE_VARIANT=cpu \
    HISTO_IMAGE_EXTRA=serve

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---------------------------------------------------------------------------------------------
# builder: Python 3.11 + the pinned serving dependencies in /opt/venv. Ubuntu 24.04 ships 3.12
# only, so uv installs a standalone CPython build (python-build-standalone, needs nothing but
# glibc) into /opt/python; the venv and that interpreter are copied into the runtime stage.
# ---------------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
ARG PYTHON_VERSION=3.11.18
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv
WORKDIR /build
# Only pyproject.toml: code and model changes below never invalidate this layer.
COPY pyproject.toml ./
RUN uv pip install -r pyproject.toml --extra "${HISTO_IMAGE_EXTRA}"

# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Fail the build, not the first request, when the base image lacks a library onnxruntime needs
# (libcuda.so.1 comes from the host driver at `docker run --gpus` time, so it may be missing here).
RUN python -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())" \
    && if [ "${HISTO_IMAGE_VARIANT}" = gpu ]; then \
        capi="$(python -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"; \
        missing="$(ldd "${capi}/libonnxruntime_providers_cuda.so" | grep 'not found' | grep -v 'libcuda\.so\.1' || true)"; \
        if [ -n "${missing}" ]; then echo "CUDA libraries missing for onnxruntime-gpu: ${missing}" >&2; exit 1; fi; \
        ldconfig -p | grep -q 'libcudnn\.so\.9' || { echo 'cuDNN 9 missing' >&2; exit 1; }; \
    fi

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin histo

WORKDIR /app
# Code and the default model: owned by root, read-only for the service user.
COPY models/*.py ./models/
COPY models/default/ ./models/default/
COPY service/ ./service/

# Defaults, all overridable with `docker run -e NAME=value`. Mount another model directory and
# point HISTO_MODEL_DIR at it to serve a different model without rebuilding.
# The values are the service's own defaults (tests/test_container.py keeps them equal);
# HISTO_ABSTAIN_THRESHOLD / HISTO_OOD_THRESHOLD / HISTO_MODEL_VARIANT stay unset: the card decides.
ENV HISTO_MODEL_DIR=/app/models/default \
    HISTO_DEVICE=auto \
    HISTO_BATCHING=1 \
    HISTO_MAX_BATCH_SIZE=64 \
    HISTO_MAX_LATENCY_MS=10000 \
    HISTO_MAX_IMAGES=64 \
    HISTO_MAX_BODY_MB=32 \
    HISTO_THREADS=0 \
    HISTO_API_WORKERS=auto \
    BENTOML_HOME=/tmp/bentoml \
    BENTOML_DO_NOT_TRACK=true

USER 10001:10001
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]
CMD ["bentoml", "serve", "service.service:HistoClassifier", "--host", "0.0.0.0", "--port", "3000"]
