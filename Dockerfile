# syntax=docker/dockerfile:1
#
# pushsvc container image, in two stages:
#   build   - compiles the Cython router into a wheel (needs gcc and the headers)
#   runtime - installs that wheel on a slim image; no compiler, no source tree
#
#   docker build -t pushsvc:$(git rev-parse --short HEAD) .
#
# The runtime runs as UID/GID 10001 with nothing to write outside /tmp, so it
# works with a read-only root filesystem (see k8s/deployment.yaml). The base
# tag names the Debian release, so the apt packages below come from one release.

FROM python:3.11-slim-trixie AS build

# Package versions are not pinned: the base tag fixes the Debian release, and a
# pinned Debian version is removed from the mirror at the next point release,
# which would break every rebuild. The stage is discarded after the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the wheel is built from (README.md is the package's readme).
COPY pyproject.toml setup.py README.md ./
COPY pushsvc ./pushsvc
# The same command as `make wheel` (Makefile), with WHEEL_DIR=/wheels.
RUN python -m pip wheel --no-deps --wheel-dir /wheels .


FROM python:3.11-slim-trixie AS runtime

# tini is PID 1: it forwards SIGTERM to `pushsvc serve` (which then drains
# its clients with 1001 within SHUTDOWN_TIMEOUT) and reaps zombies. Version
# not pinned for the same reason as in the build stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pushsvc \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin pushsvc

# No .pyc written at run time (pip compiles them at install time instead), no
# buffered logs, no pip chatter; HOME points at the one writable place.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/tmp

# The wheel is bind-mounted from the build stage, so it never becomes a layer;
# its dependencies (all with manylinux wheels) come from the package index.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir /wheels/*.whl

USER 10001:10001
WORKDIR /tmp
EXPOSE 3003

# Docker and Compose use this; Kubernetes ignores it in favour of the probes.
# urllib, not curl: the image has no curl. No proxy for a loopback request.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3003'), timeout=2)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["pushsvc", "serve"]
