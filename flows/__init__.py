"""Prefect flows over the deepalign library: the only place that talks to MLflow.

Importing this package sets offline, quiet defaults before Prefect or MLflow load.
"""

import logging
import os
from pathlib import Path

_DEFAULTS = {
    "DO_NOT_TRACK": "true",  # Prefect SDK and MLflow telemetry (MLflow wants the literal "true")
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # Prefect server telemetry
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow announces at INFO that it creates its store's tables and the experiment: a stage's
    # first run in a fresh project would print three lines before its own one-line error
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "DVC_NO_ANALYTICS": "1",
    # absolute, so Dask workers and `dvc exp run --temp` copies log to the project's store
    "MLFLOW_TRACKING_URI": f"sqlite:///{Path.cwd() / 'mlflow.db'}",
    "PREFECT_LOGGING_LEVEL": "WARNING",  # Prefect's own loggers (client, engine)
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "GIT_PYTHON_REFRESH": "quiet",
    # flow and task runs send their INFO logs to the Prefect API (the UI shows them), while
    # the terminal stays quiet: ~6 INFO lines per flow inside `dvc repro` otherwise, and a
    # failing flow's traceback, where our CLI prints one line instead
    "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
}
for _key, _value in _DEFAULTS.items():
    os.environ.setdefault(_key, _value)

# Prefect's event queue warns "Still processing items" at every short-lived process exit.
logging.getLogger("EventsWorker").setLevel(logging.ERROR)
logging.getLogger("alembic").setLevel(logging.WARNING)

# A stage command starts its private Prefect server before its own imports (flows/server.py).
from flows.server import start_early  # noqa: E402

start_early()
