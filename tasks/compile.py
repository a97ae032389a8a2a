"""Deprecated alias: ``python -m tasks.compile`` runs ``mlpipe compile``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("compile", "compile")
