"""Prefect flows, MLflow tracking and the `pfp` command line.

Importing the package makes Prefect send the project's log records (loggers `pfp`,
`export`, `deploy`, `flows`, at INFO) to the flow run's logs: the library logs through
`logging` and knows nothing of Prefect.
"""
from __future__ import annotations

import logging
import os
import sys

PROJECT_LOGGERS = ("pfp", "export", "deploy", "flows")

# Prefect reads this when it sets up its logging (on `import prefect`); a user's own setting wins.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(PROJECT_LOGGERS))
# Library code also logs outside flow runs (config checks, the CLI); that is no mistake to warn about.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

for _name in PROJECT_LOGGERS:
    _logger = logging.getLogger(_name)
    if _logger.level == logging.NOTSET:  # Prefect's root logger is at WARNING: INFO lines would be dropped
        _logger.setLevel(logging.INFO)
    if "prefect.logging.configuration" in sys.modules:
        # Prefect set up its logging before this import (a worker's flow-run process, a test
        # that imported prefect first), too late for the setting above: do what it would have
        # done, give the loggers the handlers of its `prefect.extra` logger (the API handler).
        for _handler in logging.getLogger("prefect.extra").handlers:
            if _handler not in _logger.handlers:
                _logger.addHandler(_handler)

# Pruning to a latency target is measured on a backend, which the export package does; pfp
# looks it up by this name (pfp.extensions), so pfp itself never imports export.
from pfp.extensions import LATENCY_PRUNE_MODEL, LATENCY_PRUNER, register  # noqa: E402

register(LATENCY_PRUNER, "export.latency_target:prune_round")
register(LATENCY_PRUNE_MODEL, "export.latency_target:prune_to_latency")
