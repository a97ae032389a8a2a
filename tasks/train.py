"""Deprecated alias: ``python -m tasks.train`` runs ``mlpipe train``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("train", "train")
