"""Deprecated alias: ``python -m tasks.bench`` runs ``mlpipe bench``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("bench", "bench")
