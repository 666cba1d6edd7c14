"""Partitioning across clients: disjoint, deterministic, and never touching the central held-out."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from collm_fl.data.partition import (
    DataSpec,
    load_central_heldout,
    load_client_data,
    speech_samples,
)
from collm_fl.data.shakespeare import load_plays
from collm_fl.data.types import ClientData
from collm_fl.errors import ConfigError

N_CLIENTS = 3


def _clients(spec: DataSpec, n: int = N_CLIENTS) -> list[ClientData]:
    return [load_client_data(spec, i, n) for i in range(n)]


def _texts(client: ClientData) -> list[str]:
    return [s.text for s in client.train + client.heldout]


ClientsOf = Callable[[DataSpec], list[ClientData]]


@pytest.fixture(scope="module")
def clients_of() -> ClientsOf:
    """Builds each spec's clients once per module: every build parses all 37 plays."""
    built: dict[DataSpec, list[ClientData]] = {}

    def get(spec: DataSpec) -> list[ClientData]:
        if spec not in built:
            built[spec] = _clients(spec)
        return built[spec]

    return get


@pytest.fixture(scope="module")
def play_clients(clients_of: ClientsOf) -> list[ClientData]:
    return clients_of(DataSpec(partitioning="play"))


@pytest.fixture(scope="module")
def central_texts() -> set[str]:
    return {s.text for s in load_central_heldout(DataSpec())}


def test_speech_samples_are_character_lines_of_600_to_1200_chars() -> None:
    speeches = [("HAM", "To be, or not to be: " * 5), ("HOR", "My lord?")] * 20
    samples = speech_samples(speeches)
    assert all(
        line.split(": ", 1)[0] in {"HAM", "HOR"} for s in samples for line in s.text.split("\n")
    )
    assert all(600 <= len(s.text) <= 1200 for s in samples[:-1])
    assert all(s.prompt == "" for s in samples)


def test_play_partitions_are_disjoint_and_cover_every_non_heldout_play(
    play_clients: list[ClientData], central_texts: set[str]
) -> None:
    plays = load_plays()
    expected = Counter(
        s.text for speeches in plays.values() for s in speech_samples(speeches)
    ) - Counter(central_texts)
    got = Counter(t for c in play_clients for t in _texts(c))
    assert got == expected  # each sample in exactly one client, nothing missing


@pytest.mark.parametrize("partitioning", ["play", "character", "iid", "dirichlet"])
def test_central_heldout_never_appears_in_any_client(
    partitioning: str, central_texts: set[str], clients_of: ClientsOf
) -> None:
    assert central_texts
    for client in clients_of(DataSpec(partitioning=partitioning)):
        assert not central_texts & set(_texts(client))


def test_central_heldout_is_two_whole_plays_by_default(central_texts: set[str]) -> None:
    plays = load_plays()
    held = [
        pid for pid, sp in plays.items() if {s.text for s in speech_samples(sp)} <= central_texts
    ]
    assert len(held) == 2


def test_partitions_are_deterministic_given_the_seed(play_clients: list[ClientData]) -> None:
    assert load_client_data(DataSpec(partitioning="play"), 1, N_CLIENTS) == play_clients[1]


def test_a_different_seed_gives_a_different_partition(play_clients: list[ClientData]) -> None:
    other = load_client_data(DataSpec(partitioning="play", seed=7), 1, N_CLIENTS)
    assert _texts(other) != _texts(play_clients[1])


def test_character_partition_deals_play_characters_to_clients(clients_of: ClientsOf) -> None:
    clients = clients_of(DataSpec(partitioning="character"))
    assert all("@" in c.name for c in clients)
    for c in clients:
        for text in _texts(c):
            assert text.split(": ", 1)[0]  # every line is still "CHARACTER: speech"
    all_texts = [t for c in clients for t in _texts(c)]
    assert len(all_texts) == len(set(all_texts))


def test_iid_clients_get_equal_shares(clients_of: ClientsOf) -> None:
    sizes = [len(_texts(c)) for c in clients_of(DataSpec(partitioning="iid"))]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_shares_depend_on_alpha(clients_of: ClientsOf) -> None:
    def sizes(alpha: float) -> list[int]:
        spec = DataSpec(partitioning="dirichlet", dirichlet_alpha=alpha)
        return [len(_texts(c)) for c in clients_of(spec)]

    skewed, even = sizes(0.1), sizes(100.0)
    assert skewed != even
    assert max(skewed) - min(skewed) > max(even) - min(even)


def test_heldout_is_the_last_tenth_of_a_client(play_clients: list[ClientData]) -> None:
    for c in play_clients:
        total = len(c.train) + len(c.heldout)
        assert len(c.heldout) == max(1, round(total * 0.1))


def test_max_samples_per_client_caps_a_client() -> None:
    client = load_client_data(DataSpec(max_samples_per_client=20), 0, N_CLIENTS)
    assert len(client.train) + len(client.heldout) == 20
    assert len(client.heldout) == 2


def test_unknown_partitioning_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(
        ConfigError, match=r"partitioning must be one of play, character, iid, dirichlet; got 'x'"
    ):
        DataSpec(partitioning="x")


def test_data_spec_reports_every_bad_field_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        DataSpec(dirichlet_alpha=0.0, heldout_fraction=1.5, central_heldout=-1)
    message = str(info.value)
    assert "dirichlet-alpha" in message and "heldout-fraction" in message
    assert "central-heldout" in message


@pytest.mark.parametrize("partition_id", [-1, N_CLIENTS])
def test_partition_id_out_of_range_is_a_config_error(partition_id: int) -> None:
    with pytest.raises(ConfigError, match=r"partition_id must be in \[0, 3\)"):
        load_client_data(DataSpec(), partition_id, N_CLIENTS)


def test_more_play_partitions_than_plays_suggests_character() -> None:
    with pytest.raises(ConfigError, match="partitioning='character'"):
        load_client_data(DataSpec(partitioning="play"), 0, 100)


def _user_dir(tmp_path: Path) -> Path:
    for name in ("a", "b"):
        records = [
            {"instruction": f"{name} question {i}", "output": f"answer {i}"} for i in range(20)
        ]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "ignored.csv").write_text("x\n")
    return tmp_path


def test_user_files_iid_split_is_disjoint_from_central_heldout(tmp_path: Path) -> None:
    spec = DataSpec(source=str(_user_dir(tmp_path)), partitioning="iid")
    central = {s.text for s in load_central_heldout(spec)}
    clients = _clients(spec)
    texts = [t for c in clients for t in _texts(c)]
    assert len(central) == 4  # 10 % of each file's 20 records
    assert len(texts) == len(set(texts)) == 36
    assert not central & set(texts)
    assert all(c.train[0].prompt for c in clients)  # instruction samples keep their prompt


def test_user_files_play_partitioning_falls_back_to_contiguous_runs(tmp_path: Path) -> None:
    spec = DataSpec(source=str(_user_dir(tmp_path)), partitioning="play", central_heldout=0)
    first = load_client_data(spec, 0, 2)
    questions = [s.prompt for s in first.train + first.heldout]
    assert [q for q in questions if "a question" in q] == [
        f"### User:\na question {i}\n\n### Assistant:\n" for i in range(10)
    ]
    assert sum("b question" in q for q in questions) == 10


def test_missing_user_source_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data must be"):
        load_client_data(DataSpec(source=str(tmp_path / "nope.jsonl")), 0, 1)


def test_no_copy_of_a_central_heldout_record_trains_in_any_file(tmp_path: Path) -> None:
    # Every record three times over, and file b repeats file a: held out by position, a record's
    # other copies would have trained.
    records = [json.dumps({"text": f"record {i}"}) for i in range(20)]
    (tmp_path / "a.jsonl").write_text("\n".join(records * 3))
    (tmp_path / "b.jsonl").write_text("\n".join(records[::-1]))
    spec = DataSpec(source=str(tmp_path), partitioning="iid", heldout_fraction=0.0)
    central = [s.text for s in load_central_heldout(spec)]
    trained = {t for c in _clients(spec) for t in _texts(c)}
    assert central and len(central) == len(set(central))  # one copy of each, for evaluation
    assert not set(central) & trained
    assert set(central) | trained == {f"record {i}" for i in range(20)}


def test_a_files_central_records_do_not_depend_on_the_other_files_of_its_folder(
    tmp_path: Path,
) -> None:
    """A host whose copy of the folder holds one file more (notes sorted before it) sets aside
    the same records of this file: chosen by position, they moved, and the server's held-out
    records trained on that host."""
    records = [json.dumps({"text": f"record {i}"}) for i in range(40)]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "qa.jsonl").write_text("\n".join(records))
    (tmp_path / "b" / "000-notes.txt").write_text("Some notes of this host.")

    def central_of_qa(folder: Path) -> set[str]:
        spec = DataSpec(source=str(folder), partitioning="iid")
        return {s.text for s in load_central_heldout(spec)} - {"Some notes of this host."}

    assert central_of_qa(tmp_path / "a") == central_of_qa(tmp_path / "b")


def test_a_clients_heldout_tail_has_no_copy_in_its_training_part(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"record {i % 5}"}) for i in range(40)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    spec = DataSpec(source=str(tmp_path / "a.jsonl"), central_heldout=0, heldout_fraction=0.2)
    client = load_client_data(spec, 0, 1)
    assert client.heldout and client.train
    assert not {s.text for s in client.heldout} & {s.text for s in client.train}


@pytest.mark.parametrize("lines", [["only one"], ["the same"] * 4])
def test_a_client_with_one_distinct_record_trains_on_it_and_has_no_heldout_tail(
    tmp_path: Path, lines: list[str]
) -> None:
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines))
    spec = DataSpec(source=str(tmp_path / "a.jsonl"), central_heldout=0)
    client = load_client_data(spec, 0, 1)
    assert [s.text for s in client.train] == lines and client.heldout == []


def test_a_cap_of_zero_samples_means_all_of_them() -> None:
    capped = load_client_data(DataSpec(max_samples_per_client=0), 0, N_CLIENTS)
    assert capped == load_client_data(DataSpec(), 0, N_CLIENTS)
