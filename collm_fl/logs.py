"""Log set-up for the apps and the CLI: one compact handler on the project's loggers."""

from __future__ import annotations

import logging
import sys

PROJECT_LOGGERS = ("collm_fl", "strategies", "server_app", "client_app")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Attach one stderr handler to the project's loggers (idempotent: safe to call per message)."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_collm", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
            handler._collm = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False
