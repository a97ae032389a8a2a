"""Deprecated alias: ``python -m tasks.stack`` runs ``mlpipe stack``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("stack", "stack")
