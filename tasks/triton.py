"""Deprecated alias: ``python -m tasks.triton`` runs ``mlpipe triton``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("triton", "triton")
