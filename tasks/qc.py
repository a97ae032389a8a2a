"""Deprecated alias: ``python -m tasks.qc`` runs ``mlpipe qc``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("qc", "qc")
