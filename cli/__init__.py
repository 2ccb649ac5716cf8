"""The superdiff command-line interface (installed as the ``superdiff_cli`` package)."""
