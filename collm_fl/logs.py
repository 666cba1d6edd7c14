"""Log set-up for the apps and the CLI: one compact handler on the project's loggers; output
after a hang-up."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
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


def silence_lost_terminal() -> None:
    """After a hang-up: stdout and stderr, where they went to the terminal (or a pipe, whose
    reader the hang-up ended too), go nowhere from now on, so that a command still unwinding and
    reporting does not fail writing (EIO, or a broken pipe). A hung-up terminal is no longer a
    tty (``isatty()`` fails with EIO): it is known as a character device. Files stay."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                mode = os.fstat(fd).st_mode
                if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)
