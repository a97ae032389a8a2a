"""Deprecated alias: ``python -m tasks.drops`` runs ``mlpipe drops``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("drops", "drops")
