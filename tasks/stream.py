"""Deprecated alias: ``python -m tasks.stream`` runs ``mlpipe stream``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("stream", "stream")
