# The training job: one run of `python -m flywheel_vision.train` (the entry point), or a DDP run
# when the job's command is `torchrun --nproc_per_node=N -m flywheel_vision.train`.
# Build from the repository root.
#   CPU (default): docker build -f deploy/docker/trainer.Dockerfile -t flywheel-trainer .
#   CUDA:          docker build -f deploy/docker/trainer.Dockerfile -t flywheel-trainer:cu126 \
#                    --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                    --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
# The torch wheel carries its CUDA libraries; the CUDA base adds cuDNN and the driver-facing
# runtime that NVIDIA's device plugin expects. The GPU nodes need only the driver.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/tmp \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /app
# The CUDA bases ship no Python: take the distribution's (3.11 or newer), in a virtualenv either
# way so both bases install the same way.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
# Dependencies first: torch from the index the build asked for, then the project files alone.
COPY constraints.txt ./
COPY libs/contracts/pyproject.toml libs/contracts/
COPY libs/runtime/pyproject.toml libs/runtime/
COPY libs/vision/pyproject.toml libs/vision/
RUN for package in libs/contracts/src/flywheel_contracts libs/runtime/src/flywheel_runtime \
        libs/vision/src/flywheel_vision; do \
        mkdir -p "$package" && touch "$package/__init__.py"; \
    done \
    && pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install -c constraints.txt ./libs/contracts ./libs/runtime ./libs/vision
# Then the source.
COPY libs/contracts libs/contracts
COPY libs/runtime libs/runtime
COPY libs/vision libs/vision
RUN pip install --no-deps --force-reinstall -c constraints.txt \
        ./libs/contracts ./libs/runtime ./libs/vision \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin flywheel
USER 10001
# A batch job, not a server: Kubernetes watches the process, there is nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["python", "-m", "flywheel_vision.train"]
