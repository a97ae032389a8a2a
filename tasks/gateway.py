"""Deprecated alias: ``python -m tasks.gateway`` runs ``mlpipe gateway``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("gateway", "gateway")
