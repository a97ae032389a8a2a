"""mlpipe: the pipeline steps. Each step is a module with a typed function and a CLI.

This package never imports Airflow.
"""

__version__ = "0.1.0"
