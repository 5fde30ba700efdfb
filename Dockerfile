# The teacher service: `teacher-serve` on port 8000, configured by TEACHER_SERVE_* variables,
# reading the teacher from the /teacher volume and appending to the cache in the /cache volume.
#
#   docker build -t kdcache-teacher .
#   docker run --gpus all -p 8000:8000 -v "$PWD/runs/teacher:/teacher:ro" -v "$PWD/cache:/cache" kdcache-teacher
#
# The base brings CUDA, cuDNN and torch; the project is installed beside that torch, never over it.
# Podman: build with `--format docker`, or the OCI format drops the HEALTHCHECK.
# Without a registry (the project's test machines): see README, "Deployment: container".
ARG BASE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime
FROM ${BASE}

# TORCH: a requirement installed before the project, for a base without torch, e.g.
#   --build-arg TORCH=torch==2.13.0+cpu --build-arg PIP_FIND_LINKS=/wheels -v /opt/wheels:/wheels:ro
# Empty (the default): the base's torch is used as it is.
ARG TORCH=""
# Build-time only (ARG, not ENV): where pip may find wheels that no index has.
ARG PIP_FIND_LINKS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kdcache \
    PATH=/opt/kdcache/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A virtualenv that sees the base's site-packages: the base's torch (and its CUDA libraries) is
# reused, and pip never writes into a Debian system Python (PEP 668) or a conda base.
# The constraint pins the torch that is there once TORCH is installed, so `torch>=2.4` in
# pyproject.toml is satisfied by it and pip cannot swap in another build (CUDA wheels are GBs).
# DL3013 (pin versions in pip): TORCH is the pinned requirement the builder passes in, torch is
# pinned by the constraint, and the project's own ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
    && if [ -n "$TORCH" ]; then pip install "$TORCH"; fi \
    && if ! python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > "$VIRTUAL_ENV/torch-constraint.txt"; then \
        echo "the base has no torch: pass --build-arg TORCH=torch==VERSION" >&2; exit 1; fi

# The dependencies, in a layer that only pyproject.toml invalidates: the project's metadata with
# empty package folders (pyproject.toml maps kdcache.* to them) and an empty readme installs
# exactly them, with the data extra (Pillow, pyarrow), so that teacher-push and offline-distill
# --eval read image folders, Parquet and Hugging Face datasets in the container too, and the s3
# extra (s3fs), so that replicas write one cache on a bucket (docs/deploy.md).
COPY pyproject.toml /src/
RUN touch /src/README.md \
    && mkdir -p /src/offline/cache /src/offline/sources /src/offline/lm /src/service /src/demo \
    && pip install --constraint "$VIRTUAL_ENV/torch-constraint.txt" "/src[data,s3]" \
    && rm -rf /src

# The project itself.
COPY . /src
RUN pip install --no-deps /src \
    && rm -rf /src \
    && python -c 'import torch, h5py, fastapi, kdcache.service.cli; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# A fixed UID, so that host directories mounted as volumes can be given to it (chown 10001).
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin kd \
    && mkdir -p /cache /teacher \
    && chown kd:kd /cache

ENV TEACHER_SERVE_TEACHER=/teacher/teacher.pt \
    TEACHER_SERVE_CACHE=/cache \
    TEACHER_SERVE_PORT=8000 \
    TEACHER_SERVE_DEVICE=auto

VOLUME ["/cache", "/teacher"]
EXPOSE 8000
USER 10001:10001
WORKDIR /home/kd

# Ready once the teacher is loaded and warmed up; a large teacher can take minutes to load,
# so failures in the first 5 minutes do not count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('TEACHER_SERVE_PORT', '8000'), timeout=4)"]

# Exec form: teacher-serve is PID 1 and gets SIGTERM itself, so `docker stop` publishes the open shard.
CMD ["teacher-serve", "--host", "0.0.0.0"]
