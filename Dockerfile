# lorastream in one image: every command (topics, score, train, produce, adapters follow …).
#
# TORCH_INDEX chooses the PyTorch build. Only torch itself comes from that index; every
# other package comes from PyPI at the version constraints.txt pins (torch's too: 2.15.0).
#
#   https://download.pytorch.org/whl/cpu   the default: the CPU build (no CUDA libraries),
#                                          for the scorer, the producer, the follower and a
#                                          trainer on the CPU
#   https://pypi.org/simple                PyPI's Linux build, made with CUDA 13.2 (torch
#                                          2.15.0+cu132, with the nvidia-*-cu13 wheels
#                                          constraints.txt pins): about 5 GB more. It needs an
#                                          NVIDIA driver >= 580 (the minimum for CUDA 13.x)
#                                          and a GPU of compute capability 7.5 or newer
#                                          (its kernels: sm_75 … sm_120)
#
#   docker build -t lorastream:cpu .
#   docker build -t lorastream:cuda --build-arg TORCH_INDEX=https://pypi.org/simple .
#
# docker-compose.yml builds the first for every service; docker-compose.gpu.yml builds the
# second for the trainer alone. The image runs as 1000:1000 and keeps its state in /data
# (LORASTREAM_HOME; adapters in /data/adapters). Without compose, mount a host directory
# at the same path inside, so that announced paths open on the host too:
#   mkdir -p adapters && docker run --rm --user "$(id -u):$(id -g)" \
#     -v "$PWD/adapters:$PWD/adapters" -e LORASTREAM_ADAPTER_DIR="$PWD/adapters" \
#     lorastream:cpu -b BROKER:9092 train
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app

# The dependencies first, each in its own layer, so that a change to the code rebuilds only
# the last small one. torch alone from TORCH_INDEX (--no-deps: its dependencies come from
# PyPI below). A "+cpu" build satisfies constraints.txt's "torch==2.15.0", so the second
# install keeps it rather than fetching PyPI's CUDA build. (hadolint cannot see that the
# pin comes from constraints.txt.)
COPY pyproject.toml constraints.txt ./
# hadolint ignore=DL3013
RUN torch_pin="$(grep -E '^torch==' constraints.txt)" \
 && pip install --no-deps --index-url "$TORCH_INDEX" "$torch_pin"
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

COPY README.md ./
COPY schemas ./schemas
COPY streams ./streams
COPY trainer ./trainer
COPY lorastream ./lorastream
RUN pip install --no-deps . && pip check

# The demo profile's input (docker compose --profile demo up).
COPY docker/example-results.jsonl ./docker/example-results.jsonl

# Any user may run the image (compose runs it as the host's UID:GID): the state directory
# is writable by all, and HOME points somewhere writable for libraries that cache there.
RUN mkdir -p /data && chmod 1777 /data
ENV HOME=/tmp \
    LORASTREAM_HOME=/data \
    LORASTREAM_ADAPTER_DIR=/data/adapters \
    HF_HUB_OFFLINE=1
USER 1000:1000
ENTRYPOINT ["lorastream"]
