"""Deprecated alias: ``python -m tasks.bus broker`` runs ``mlpipe broker``, ``topics`` runs ``mlpipe kafka topics``."""

if __name__ == "__main__":
    import sys

    from tasks.cli import deprecated_alias

    if sys.argv[1:2] == ["broker"]:
        del sys.argv[1]
        deprecated_alias("bus broker", "broker")
    deprecated_alias("bus", "kafka")
