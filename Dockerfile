# One container = one worker = one visible GPU. The CUDA build of torch comes from the base
# image; `pip install .` keeps it because it already satisfies torch>=2.6,<3 (the build fails
# below if a CPU wheel ever replaced it).
#
#   docker build -t inference-fabric:0.1.0 .
#   docker run --gpus 1 -v $PWD/deploy/engine.toml:/etc/fabric/engine.toml:ro inference-fabric:0.1.0
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# Caches (torch.compile, triton, HF) go to /tmp, so the root filesystem can be read-only.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/cache/inductor

WORKDIR /opt/fabric

# Dependencies first, from pyproject.toml alone, so a source change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY worker/ worker/
COPY schemas/ schemas/
COPY loadgen/ loadgen/
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch in the image is not a CUDA build')" \
    && fabric-worker --help > /dev/null \
    && fabric-loadgen --help > /dev/null

# Numeric uid, so Kubernetes can verify runAsNonRoot. The engine config is mounted into
# /etc/fabric as a file (compose: bind mount, Kubernetes: ConfigMap), never baked in.
RUN groupadd --system --gid 10001 fabric \
    && useradd --system --uid 10001 --gid fabric --home-dir /home/fabric --create-home --shell /usr/sbin/nologin fabric \
    && mkdir -p /etc/fabric

USER 10001:10001

# Prometheus /metrics, /healthz and /readyz.
EXPOSE 9400

# The worker drains on SIGTERM (stop fetching, finish or nak in-flight work, exit 0).
STOPSIGNAL SIGTERM

# /healthz = process and executor thread alive. The base image has no curl, so use Python.
# start-period covers model load and CUDA warm-up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["fabric-worker"]
CMD ["run", "--config", "/etc/fabric/engine.toml", "--metrics-port", "9400"]
