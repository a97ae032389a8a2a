"""Deprecated alias: ``python -m tasks.validate`` runs ``mlpipe validate``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("validate", "validate")
