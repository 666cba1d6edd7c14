"""Limits on what a client may send to an HTTP API (a replica's, its control API, the gateway's).

A module of its own, importing nothing heavy: the CLI's parser shows these defaults.
"""

from __future__ import annotations

import math

from collm_fl.errors import ConfigError

DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_BODY_TIMEOUT_S = 30.0  # a client that stops sending its body this long gets a 408


def check_body_timeout(seconds: float) -> None:
    """ConfigError unless ``seconds`` (``--body-timeout``) is a finite number > 0."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"--body-timeout must be a finite number of seconds > 0, got {seconds:g}")
