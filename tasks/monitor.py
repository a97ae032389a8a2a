"""Deprecated alias: ``python -m tasks.monitor`` runs ``mlpipe monitor``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("monitor", "monitor")
