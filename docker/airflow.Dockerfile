# Airflow (api-server / scheduler / dag-processor / triggerer) with the mlpipe DAGs and plugins.
# Build from the repository root:  docker build -f docker/airflow.Dockerfile -t mlpipe/airflow .
FROM apache/airflow:3.3.2-python3.11
USER root
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
USER airflow
COPY requirements.txt /opt/mlpipe/requirements.txt
RUN pip install --no-cache-dir -r /opt/mlpipe/requirements.txt
COPY tasks /opt/mlpipe/tasks
COPY models /opt/mlpipe/models
COPY dags /opt/airflow/dags
COPY plugins /opt/airflow/plugins
COPY airflow.cfg /opt/airflow/airflow.cfg
ENV PYTHONPATH=/opt/mlpipe \
    AIRFLOW_CONFIG=/opt/airflow/airflow.cfg \
    MLPIPE_EXECUTION=kubernetes
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/entrypoint"]
CMD ["airflow", "api-server"]
