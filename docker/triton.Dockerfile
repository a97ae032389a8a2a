# Triton for production: the NGC image has the onnxruntime and tensorrt backends the production
# flavour of the model repository uses (tasks/model_repo.py, flavour "production"); the Python
# backend runs preprocess/postprocess and needs numpy.
# Build from the repository root:  docker build -f docker/triton.Dockerfile -t mlpipe/triton .
FROM nvcr.io/nvidia/tritonserver:25.10-py3
RUN pip install --no-cache-dir numpy==1.26.4
COPY model_repo/python /opt/mlpipe/model_repo/python
EXPOSE 8000 8001 8002
ENTRYPOINT ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", "--strict-readiness=false", "--exit-on-error=false"]
