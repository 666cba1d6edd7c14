"""Domain errors: every failure a user can cause has a type and a message naming what is wrong."""

from __future__ import annotations


class CollmError(Exception):
    """Base class of every error CoLLM-FL raises on purpose.

    ``exit_code`` is the ``collm`` command's exit status when one ends it: 2 for what the user
    can fix in the command (bad input), 1 for a failure of the work itself (:class:`WorkFailed`).
    """

    exit_code = 2


class WorkFailed(CollmError):
    """The work failed, not its input: a process that did not start, a server gone (exit 1)."""

    exit_code = 1


class ConfigError(CollmError):
    """A run-config value, CLI argument or option is invalid (names the key and the value)."""


class ChatTemplateError(CollmError):
    """A model's chat template refused a conversation (e.g. a system turn, or roles that do not
    alternate, where the template allows neither)."""


class DataFormatError(CollmError):
    """A data file is malformed; the message names the file and, where known, the line (a JSON
    list's records have none: ``record``, their index, is in the reason)."""

    def __init__(
        self, path: str, reason: str, line: int | None = None, record: int | None = None
    ) -> None:
        self.path = path
        self.line = line
        self.record = record
        self.reason = reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


class ModelLoadError(CollmError):
    """A base model or tokenizer cannot be loaded (missing file, missing package, no GPU)."""


class AdapterValidationError(CollmError):
    """An adapter update or stored version fails validation; carries every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) if self.problems else "invalid adapter")


class VersionConflictError(CollmError):
    """A version change this replica cannot make in its present state (an older version than
    the served one, a merge while requests run on a slot); nothing was changed."""


class StoreError(CollmError):
    """The version store cannot read or write a run, round or version."""


class VersionNotStoredError(StoreError):
    """The store holds no such version (as opposed to one it holds but cannot read)."""
