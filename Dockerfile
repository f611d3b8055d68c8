# The lr-finder training job on an NVIDIA GPU: `docker run --gpus all IMAGE -P auto_lr=true` is `mlflow run` of
# the baked project. Build: `lr-finder build` (or `docker build .`); see the README's "GPU container and CI runners".
#
# BASE_IMAGE: any glibc Debian/Ubuntu image with the interpreter named by PYTHON in its apt sources. The torch
# wheels bundle their own CUDA runtime, so the base only supplies the OS; an nvidia/cuda base also makes the
# container toolkit refuse to start on a host driver older than its CUDA version, with a clear message.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu22.04
FROM ${BASE_IMAGE}

# conda.yaml's python=3.11: python3.11 is Debian bookworm's python3 and in Ubuntu 22.04's universe.
ARG PYTHON=python3.11
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Distribution packages follow the base image's release; the Python packages below are pinned exactly.
# ~/.cache exists and is lrfinder's: docker fills a new named volume mounted there (--cache) with its owner.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "${PYTHON}" "${PYTHON}-venv" ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && "${PYTHON}" -m venv /opt/venv \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash lrfinder \
    && install -d -o lrfinder -g lrfinder /data /home/lrfinder/.cache

ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    GIT_PYTHON_REFRESH=quiet \
    PYTHONPATH=/opt/lr-finder \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# torch first, in its own layer, so that neither a code change nor another pin reinstalls it (several GB).
# TORCH_VARIANT picks the wheel build and with it the host driver the image needs:
#   pypi   PyPI's build, CUDA 13.0: NVIDIA driver >= 580
#   cu128  download.pytorch.org's CUDA 12.8 build: driver >= 570 (>= 525 through CUDA 12 minor-version compatibility)
#   cu126  download.pytorch.org's CUDA 12.6 build: driver >= 560 (>= 525 likewise)
#   cpu    no GPU support, no driver
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL: a private mirror (build args only: never stored in the image's environment).
ARG TORCH_VARIANT=pypi
# constraints.txt's torch and torchvision (tests/test_contract.py).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
# Both packages are pinned; hadolint reads the optional "$@" (the variant's index) as an unpinned package.
# hadolint ignore=DL3013
RUN if [ "${TORCH_VARIANT}" != pypi ]; then set -- --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"; fi \
    && pip install "$@" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The rest of the job's environment: pyproject.toml's [job] extra at constraints.txt's versions, exactly. torch
# stays as installed above: its pin there matches TORCH_VERSION (tests/test_contract.py), a local +cu126 included.
COPY pyproject.toml constraints.txt /tmp/lock/
RUN python -c 'import tomllib; project = tomllib.load(open("/tmp/lock/pyproject.toml", "rb"))["project"]; \
        print(*project["optional-dependencies"]["job"], sep="\n")' > /tmp/lock/job.txt \
    && pip install -c /tmp/lock/constraints.txt -r /tmp/lock/job.txt \
    && pip check \
    && rm -rf /tmp/lock

# constraints.txt stays in the image: a derived image installs its extra packages against it (examples/docker).
COPY MLproject conda.yaml constraints.txt /opt/lr-finder/
COPY mlproject /opt/lr-finder/mlproject/

# /data: the dataset (Fashion-MNIST's four IDX files, mounted read-only). Without it the job downloads into
# ~/.cache/mlproject: mount a volume at /home/lrfinder/.cache to keep the download.
# MLFLOW_TRACKING_URI and MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN come from the environment at run time.
ENV FASHION_MNIST_DIR=/data
VOLUME ["/data"]
# Numeric, so that runtimes can verify it is not root without reading /etc/passwd.
USER 1000:1000
WORKDIR /home/lrfinder

# mlflow run is PID 1 and installs no SIGTERM handler; SIGINT makes it cancel the job and exit at once.
STOPSIGNAL SIGINT
ENTRYPOINT ["mlflow", "run", "/opt/lr-finder", "--env-manager", "local"]
CMD []

# Last, so that a new commit only relabels the image (no build date: an unchanged tree rebuilds the same image).
ARG BASE_IMAGE
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="lr-finder" \
      org.opencontainers.image.description="LR range test, then training, tracked in MLflow: mlflow run of the baked project" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
