# CPU image for the non-GPU steps run as pods (validate, register, qc, deploy, monitor).
# Build from the repository root:  docker build -f docker/tasks.Dockerfile -t mlpipe/tasks .
FROM python:3.11-slim
WORKDIR /opt/mlpipe
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY tasks ./tasks
COPY models ./models
COPY model_repo ./model_repo
ENV PYTHONPATH=/opt/mlpipe PYTHONUNBUFFERED=1
USER 65534
# The step is chosen by the pod's command: python -m tasks.cli <step> ... (mlpipe <step>)
ENTRYPOINT ["python", "-m"]
CMD ["tasks.cli", "--help"]
