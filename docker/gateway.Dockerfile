# Ingest gateway (FastAPI + uvicorn): mlpipe gateway.
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t mlpipe/gateway .
# Run:  docker run -e MLPIPE_GATEWAY_TOKEN=... -e MLPIPE_KAFKA_BOOTSTRAP=kafka:9092 -p 8080:8080 mlpipe/gateway
# Dependencies at the pins of requirements.txt; python-multipart (multipart uploads) is not pinned there.
FROM python:3.11-slim
WORKDIR /opt/mlpipe
COPY requirements.txt .
RUN grep -E '^(confluent-kafka|fastapi|uvicorn|pillow)==' requirements.txt > gateway-requirements.txt \
    && test "$(wc -l < gateway-requirements.txt)" -eq 4 \
    && pip install --no-cache-dir -r gateway-requirements.txt python-multipart==0.0.34
COPY tasks ./tasks
COPY models ./models
ENV PYTHONPATH=/opt/mlpipe PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MLPIPE_HOME=/tmp/mlpipe \
    MLPIPE_GATEWAY_HOST=0.0.0.0 MLPIPE_GATEWAY_PORT=8080
USER 65534
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "tasks.cli", "gateway"]
CMD []
