"""Deprecated alias: ``python -m tasks.registry`` runs ``mlpipe registry``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("registry", "registry")
