# TensorRT compiler: runs `mlpipe compile` on the serving GPU type (KubernetesPodOperator
# with nvidia.com/gpu: 1). The NGC TensorRT image ships the TensorRT Python API and trtexec.
# Build from the repository root:  docker build -f docker/trt-compiler.Dockerfile -t mlpipe/trt-compiler .
# Only what the compile step imports is installed, at the exact pins of requirements.txt (the grep
# keeps requirements.txt the single source of versions, e.g. pyarrow 25, which accepts numpy<2).
FROM nvcr.io/nvidia/tensorrt:25.10-py3
WORKDIR /opt/mlpipe
COPY requirements.txt .
RUN grep -E '^(minio|onnx|onnxruntime|numpy|pandas|pyarrow|pillow|matplotlib)==' \
        requirements.txt > compiler-requirements.txt \
    && test "$(wc -l < compiler-requirements.txt)" -eq 8 \
    && pip install --no-cache-dir -r compiler-requirements.txt
COPY tasks ./tasks
COPY models ./models
ENV PYTHONPATH=/opt/mlpipe PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m", "tasks.cli", "compile"]
