"""Deprecated alias: ``python -m tasks.airflow_local`` runs ``mlpipe airflow``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("airflow_local", "airflow")
