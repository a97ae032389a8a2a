"""Deprecated alias: ``python -m tasks.demo`` runs ``mlpipe demo``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("demo", "demo")
