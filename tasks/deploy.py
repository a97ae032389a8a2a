"""Deprecated alias: ``python -m tasks.deploy`` runs ``mlpipe deploy``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("deploy", "deploy")
