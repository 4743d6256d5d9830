# syntax=docker/dockerfile:1.7
# RunPod serverless worker for GaMS-9B-Instruct on vLLM. Build with docker-bake.hcl:
#   docker buildx bake worker                       # model fetched at start (cache/volume/hub)
#   HF_TOKEN=... docker buildx bake worker-baked    # GaMS-9B-Instruct baked into the image
#
# CUDA: the base image's CUDA must be the one the pinned vLLM wheel was built for.
# vLLM 0.25.1 on PyPI requires torch==2.11.0, whose Linux x86_64 wheel requires
# cuda-toolkit==13.0.2 (libcudart.so.13): CUDA 13.0, so hosts need NVIDIA driver >= 580.
# tests/test_image.py checks VLLM_CUDA below against requirements.txt's vLLM pin.
# VLLM_CUDA=13.0
#
# CUDA 12.x hosts (driver 550-575): build the `worker-cu129` target of docker-bake.hcl. It sets
# CUDA_VERSION=12.9.1 and VLLM_WHEEL to vLLM's own CUDA 12.9 wheel of the same version (GitHub
# release asset, +cu129) with TORCH_INDEX=https://download.pytorch.org/whl/cu129. Untested here.

ARG CUDA_VERSION=13.0.2

# ---- base: CUDA runtime, Python 3.12 (Ubuntu 24.04's), a venv --------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04 AS base
# gcc and the Python headers: Triton compiles its small launcher stubs on first use.
# Ubuntu's package versions are left to the pinned base image (24.04 updates are security fixes).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# ---- bake: the model files, when MODEL_NAME is given (independent of the vLLM install) -------
FROM base AS bake
RUN pip install huggingface_hub==2.4.0
WORKDIR /app
# Only what the bake step imports, so code changes elsewhere keep this layer cached.
COPY gams_worker/__init__.py gams_worker/errors.py gams_worker/
COPY gams_worker/startup/__init__.py gams_worker/startup/model_files.py gams_worker/startup/
COPY builder/__init__.py builder/download_model.py builder/
ARG MODEL_NAME=""
ARG MODEL_REVISION=main
# The token is a BuildKit secret: mounted for this step only, never in a layer or the image.
RUN --mount=type=secret,id=hf_token,required=false \
    python -m builder.download_model --model "${MODEL_NAME}" --revision "${MODEL_REVISION}" \
        --out /models --token-file /run/secrets/hf_token

# ---- worker ----------------------------------------------------------------------------------
FROM base AS worker
WORKDIR /app
# vLLM (pinned in requirements.txt) first: the slowest layer, rebuilt only when the pins change.
ARG VLLM_WHEEL=""
ARG TORCH_INDEX=""
COPY requirements.txt requirements-runpod.txt ./
RUN pip install -r requirements.txt ${VLLM_WHEEL:+"$VLLM_WHEEL"} ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
    && pip install --no-deps -r requirements-runpod.txt \
    && python -c "import vllm, runpod; print('vllm', vllm.__version__, 'runpod', runpod.__version__)"
COPY --from=bake /models /models
ARG MODEL_NAME=""
ARG MODEL_REVISION=""
# An empty MODEL_NAME means the config's default, cjvt/GaMS-9B-Instruct.
# A mounted network volume gets the HF cache (/runpod-volume/huggingface-cache/hub): see
# gams_worker/startup/model.py; HF_TOKEN at run time is read by huggingface_hub itself.
# RUNPOD_LOG_LEVEL: the SDK's default, DEBUG, logs every streamed chunk two or three times.
ENV MODEL_NAME=${MODEL_NAME} \
    MODEL_REVISION=${MODEL_REVISION} \
    BAKED_MODEL_MANIFEST=/models/manifest.json \
    NETWORK_VOLUME_PATH=/runpod-volume \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    RUNPOD_LOG_LEVEL=INFO
COPY handler.py test_input.json ./
COPY gams_worker/ gams_worker/
CMD ["python", "handler.py"]
