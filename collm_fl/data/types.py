"""The data types every loader returns and every consumer (tokenizer, trainer, evaluator) reads."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TextSample:
    """One training text. ``prompt`` is a prefix of ``text`` whose tokens are not trained on.

    Plain text (plays, documents) has ``prompt == ""``; an instruction or chat sample has the
    formatted prompt there and prompt + completion in ``text``, so the loss covers the answer only.
    """

    text: str
    prompt: str = ""

    def __post_init__(self) -> None:
        if not self.text.startswith(self.prompt):
            raise ValueError("TextSample.prompt must be a prefix of TextSample.text")


@dataclass(frozen=True)
class ChatRecord:
    """A conversation as read from a user file, before a tokenizer's chat template formats it.

    ``messages`` holds ``(role, content)`` pairs; the last one is the assistant's answer to learn.
    Instruction records (``instruction``/``input``/``output``) become a user turn and an answer.
    """

    messages: tuple[tuple[str, str], ...]


Record = TextSample | ChatRecord
"""What `load_records` returns: plain text is ready to train on, a chat still needs formatting."""


@dataclass(frozen=True)
class ClientData:
    """One federated client's data: samples to train on and a held-out tail to evaluate on.

    ``name`` says where the data came from, e.g. ``"hamlet"`` (a play) or ``"HAM@hamlet"`` (a
    character of a play), for logs and metrics.
    """

    train: list[TextSample]
    heldout: list[TextSample]
    name: str
