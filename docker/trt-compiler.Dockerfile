# TensorRT compiler: runs `mlpipe compile` on the serving GPU type (KubernetesPodOperator
# with nvidia.com/gpu: 1). The NGC TensorRT image ships the TensorRT Python API and trtexec.
# Build from the repository root:  docker build -f docker/trt-compiler.Dockerfile -t mlpipe/trt-compiler .
FROM nvcr.io/nvidia/tensorrt:25.10-py3
WORKDIR /opt/mlpipe
COPY requirements.txt .
RUN pip install --no-cache-dir minio==7.2.20 onnx==1.23.2 onnxruntime==1.31.1 numpy==1.26.4 pandas==3.0.6 pyarrow==26.0.1 pillow==13.0.0 matplotlib==3.11.2
COPY tasks ./tasks
ENV PYTHONPATH=/opt/mlpipe PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m", "tasks.cli", "compile"]
