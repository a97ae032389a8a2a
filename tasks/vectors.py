"""Deprecated alias: ``python -m tasks.vectors`` runs ``mlpipe vectors``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("vectors", "vectors")
