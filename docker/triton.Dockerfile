# Triton for production: the NGC image has the onnxruntime and tensorrt backends the production
# flavour of the model repository uses (tasks/model/repo.py, flavour "production"), and its S3
# filesystem reads the repository the deploy step writes to MinIO
# (--model-repository=s3://host:port/bucket/prefix, keys in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY);
# the Python backend runs preprocess/postprocess and needs numpy (pinned as in requirements.txt).
# Build from the repository root:  docker build -f docker/triton.Dockerfile -t ghcr.io/mlpipe/triton:0.1.0 .
# docker/k8s/serving-deployment.yaml runs this image with its own arguments (they replace CMD).
FROM nvcr.io/nvidia/tritonserver:25.10-py3
COPY requirements.txt /tmp/requirements.txt
RUN grep -E '^numpy==' /tmp/requirements.txt > /tmp/triton-requirements.txt \
    && test "$(wc -l < /tmp/triton-requirements.txt)" -eq 1 \
    && pip install --no-cache-dir -r /tmp/triton-requirements.txt \
    && rm /tmp/requirements.txt /tmp/triton-requirements.txt
COPY model_repo/python /opt/mlpipe/model_repo/python
EXPOSE 8000 8001 8002
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/models", "--model-control-mode=explicit", "--strict-readiness=false", "--exit-on-error=false"]
