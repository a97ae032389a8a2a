"""Deprecated alias: ``python -m tasks.model_repo`` runs ``mlpipe model-repo``."""

if __name__ == "__main__":
    from tasks.cli import deprecated_alias

    deprecated_alias("model_repo", "model-repo")
