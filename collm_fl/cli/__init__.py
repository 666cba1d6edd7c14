"""The ``collm`` command line: models, federation, replicas, gateway, load, benchmarks.

Exit codes: 0 success, 2 bad input (arguments, config, data, missing packages) with a one-line
reason on stderr, 1 for a failure of the work itself (e.g. a local process that did not start).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from collm_fl.cli.commands import dispatch
from collm_fl.cli.parser import build_parser
from collm_fl.errors import CollmError
from collm_fl.logs import setup_logging, silence_lost_terminal

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so every process a command started is
    # stopped by its `with` block; servers that handle signals themselves install their own.
    signal.signal(signal.SIGTERM, _terminated)
    # A hang-up (the terminal or SSH session gone) too, for the commands that start processes,
    # unless it is ignored (nohup). (A server's default end on SIGHUP stays: it starts nothing.)
    hangup = getattr(signal, "SIGHUP", None)
    if (
        hangup is not None
        and args.command not in ("replica", "gateway")
        and signal.getsignal(hangup) is signal.SIG_DFL
    ):
        signal.signal(hangup, _hung_up)
    try:
        return dispatch(args)
    except CollmError as e:
        print(f"collm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("collm: interrupted", file=sys.stderr)
        return 130


def _terminated(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _hung_up(signum: int, frame: object) -> None:
    """The terminal is gone: writing to it would fail (EIO) while the command unwinds and
    reports, so its output goes nowhere from now on; then as SIGTERM."""
    silence_lost_terminal()
    _terminated(signum, frame)


if __name__ == "__main__":
    raise SystemExit(main())
