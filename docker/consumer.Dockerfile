# Streaming consumer, the Triton sidecar: mlpipe stream (docker/k8s/serving-deployment.yaml).
# Build from the repository root:  docker build -f docker/consumer.Dockerfile -t mlpipe/consumer .
# Only what the consumer imports is installed, at the exact pins of requirements.txt (the grep keeps
# requirements.txt the single source of versions; no torch or Airflow in this image).
FROM python:3.11-slim
WORKDIR /opt/mlpipe
COPY requirements.txt .
RUN grep -E '^(confluent-kafka|tritonclient\[http,grpc\]|qdrant-client|numpy|pillow|prometheus-client)==' \
        requirements.txt > consumer-requirements.txt \
    && test "$(wc -l < consumer-requirements.txt)" -eq 6 \
    && pip install --no-cache-dir -r consumer-requirements.txt
COPY tasks ./tasks
COPY models ./models
# MLPIPE_HOME must be writable by the non-root user (only local-mode Qdrant writes there; in a pod
# MLPIPE_QDRANT_URL points at the Qdrant server). The HTTP endpoint listens on all interfaces so the
# kubelet's probes and Prometheus reach /healthz, /readyz and /metrics.
ENV PYTHONPATH=/opt/mlpipe PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MLPIPE_HOME=/tmp/mlpipe \
    MLPIPE_CONSUMER_HTTP_HOST=0.0.0.0 MLPIPE_CONSUMER_HTTP_PORT=9108 MLPIPE_TRITON_GRPC_URL=localhost:8001
USER 65534
EXPOSE 9108
# SIGTERM: stop fetching, finish the batch in hand, commit, exit (well within 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "tasks.cli", "stream"]
CMD []
