# syntax=docker/dockerfile:1.7
# RunPod serverless worker for GaMS-9B-Instruct on vLLM. Build with docker-bake.hcl:
#   docker buildx bake worker                       # model fetched at start (cache/volume/hub)
#   HF_TOKEN=... docker buildx bake worker-baked    # GaMS-9B-Instruct baked into the image
#
# CUDA: the base image's CUDA must be the one the pinned vLLM wheel was built for.
# vLLM 0.32.0 on PyPI requires torch==2.13.0, whose Linux x86_64 wheel requires
# cuda-toolkit==13.0.3 (libcudart.so.13): CUDA 13.0, so hosts need NVIDIA driver >= 580.
# tests/test_image.py checks VLLM_CUDA below against requirements.txt's vLLM pin.
# VLLM_CUDA=13.0
#
# Packages: requirements.lock (scripts/lock.sh), installed with --no-deps, so the image holds
# exactly the versions the GPU runs and the lock name. The CPU test image (tests/test_container_cpu.py)
# is this file with BASE_IMAGE/PYTHON set to a Debian base and LOCK=requirements-cpu.lock.
#
# CUDA 12.x hosts (driver 550-575): build the `worker-cu129` target of docker-bake.hcl. It sets
# CUDA_VERSION=12.9.1 and VLLM_WHEEL to vLLM's own CUDA 12.9 wheel of the same version (GitHub
# release asset, +cu129) with TORCH_INDEX=https://download.pytorch.org/whl/cu129. Untested here.

ARG CUDA_VERSION=13.0.2
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04

# ---- wheels: wheels no index serves (the CPU image's torch+cpu), given as the build context
# "wheels" (podman/docker build --build-context wheels=DIR); empty otherwise.
FROM scratch AS wheels

# ---- base: the OS, Python (the base image's own), a venv ------------------------------------
FROM ${BASE_IMAGE} AS base
ARG PYTHON=python3.12
# gcc and the Python headers: Triton compiles its small launcher stubs on first use.
# Ubuntu's package versions are left to the pinned base image (24.04 updates are security fixes).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends "${PYTHON}" "${PYTHON}-venv" "${PYTHON}-dev" gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && "${PYTHON}" -m venv /opt/venv
# pip's HTTP cache lives in a build cache mount (RUN --mount=type=cache), never in a layer.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# ---- bake: the model files, when MODEL_NAME is given (independent of the vLLM install) -------
FROM base AS bake
# A TLS-intercepting proxy's CA, where one is in the way: the build secret "cacert", mounted for
# this step only (never in a layer). Without it pip uses its own CA bundle.
RUN --mount=type=cache,id=gams-pip,target=/root/.cache/pip \
    --mount=type=secret,id=cacert,required=false \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
    && pip install huggingface_hub==2.4.0
WORKDIR /app
# Only what the bake step imports, so code changes elsewhere keep this layer cached.
COPY gams_worker/__init__.py gams_worker/errors.py gams_worker/
COPY gams_worker/startup/__init__.py gams_worker/startup/model_files.py gams_worker/startup/
COPY builder/__init__.py builder/download_model.py builder/
ARG MODEL_NAME=""
ARG MODEL_REVISION=main
# Another hub than huggingface.co (the tests' local fake hub); empty means the real one.
ARG HF_ENDPOINT=""
# The token is a BuildKit secret: mounted for this step only, never in a layer or the image.
RUN --mount=type=secret,id=hf_token,required=false \
    if [ -z "${HF_ENDPOINT}" ]; then unset HF_ENDPOINT; fi \
    && python -m builder.download_model --model "${MODEL_NAME}" --revision "${MODEL_REVISION}" \
        --out /models --token-file /run/secrets/hf_token

# ---- worker ----------------------------------------------------------------------------------
FROM base AS worker
WORKDIR /app
# The weights first (18.5 GB for GaMS-9B): a pin change below rebuilds the packages, not them.
COPY --from=bake /models /models
# The packages (10 GB): one layer, rebuilt only when the lock changes; pip's HTTP cache in the
# cache mount spares that rebuild the downloads, where the index sends cache headers (PyPI does).
ARG LOCK=requirements.lock
ARG VLLM_WHEEL=""
ARG TORCH_INDEX=""
COPY ${LOCK} /tmp/requirements.lock
RUN --mount=type=cache,id=gams-pip,target=/root/.cache/pip \
    --mount=type=secret,id=cacert,required=false \
    --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
    && pip install --no-deps --find-links /wheels -r /tmp/requirements.lock \
        ${VLLM_WHEEL:+"$VLLM_WHEEL"} ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
    && python -c "import vllm, runpod; print('vllm', vllm.__version__, 'runpod', runpod.__version__)"
# pip check, less the conflicts accepted on purpose (runpod's fastapi declaration), each explained there.
COPY builder/check_install.py /tmp/
RUN python /tmp/check_install.py
# OS packages a variant needs at run time (the CPU image: libnuma1 for vLLM's CPU kernels); after
# the package layer, so setting them rebuilds nothing above.
ARG SYSTEM_PACKAGES=""
# hadolint ignore=DL3008
RUN if [ -n "${SYSTEM_PACKAGES}" ]; then \
        apt-get update && apt-get install -y --no-install-recommends ${SYSTEM_PACKAGES} && rm -rf /var/lib/apt/lists/*; \
    fi
# vLLM's model info for the GaMS classes: without it, a start on a new compile cache folder has
# vLLM inspect the class in a subprocess that imports torch and vLLM again (20 s on the H100).
# The worker copies it into the folder it chooses (gams_worker/startup/compile_cache.py).
COPY builder/seed_model_info.py /tmp/
RUN python /tmp/seed_model_info.py --out /opt/gams-worker/model-info
ARG MODEL_NAME=""
ARG MODEL_REVISION=""
# An empty MODEL_NAME means the config's default, cjvt/GaMS-9B-Instruct.
# A mounted network volume gets the HF cache (/runpod-volume/huggingface-cache/hub): see
# gams_worker/startup/model.py; HF_TOKEN at run time is read by huggingface_hub itself.
# RUNPOD_LOG_LEVEL: the SDK's default, DEBUG, logs every streamed chunk two or three times.
# VLLM_USE_FLASHINFER_SAMPLER=0: vLLM's PyTorch sampler, the one every GPU measurement used
# (MAINTAINERS.md: "FlashInfer in the image").
# RUNPOD_MIN_CUDA_VERSION: the SDK's start-up check fails a worker whose driver is older than the
# image's CUDA (MAINTAINERS.md: "Hosts the image runs on"); it is skipped where RUNPOD_SKIP_AUTO_SYSTEM_CHECKS is set.
ENV MODEL_NAME=${MODEL_NAME} \
    MODEL_REVISION=${MODEL_REVISION} \
    BAKED_MODEL_MANIFEST=/models/manifest.json \
    NETWORK_VOLUME_PATH=/runpod-volume \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VLLM_USE_FLASHINFER_SAMPLER=0 \
    RUNPOD_MIN_CUDA_VERSION=13.0 \
    RUNPOD_LOG_LEVEL=INFO
COPY handler.py test_input.json ./
COPY gams_worker/ gams_worker/
# The drift guard: this vLLM is the release the worker is tested on, and holds every name and engine
# argument the worker uses (gams_worker/startup/vllm_release.py); a vLLM bump fails here, naming them.
RUN python -m gams_worker.startup.vllm_release
# The input contract against this image's vLLM: every hostile case of the test suite refused by field
# (or passed on) before vLLM sees it, with no GPU and no engine. The cases are mounted, not shipped.
RUN --mount=type=bind,source=tests,target=/app/tests \
    python -m tests.harness.hostile_cases --contract-only
# handler.py handles SIGTERM from its first line (python is PID 1 here, which ignores a signal
# it has no handler for): a scale-down during the engine start stops the worker at once.
CMD ["python", "handler.py"]
