"""Split a corpus across federated clients, LEAF-style, and keep a central held-out set apart.

The corpus is either Shakespeare's plays (``source="shakespeare"``) or the user's own files (a
file or a folder of ``.json``/``.jsonl``/``.txt``/``.md`` files, see `collm_fl.data.files`). Either
way it is a list of *groups* — a play, or a file — each an ordered list of samples; for the plays
a sample is a run of consecutive speeches, ``"CHARACTER: speech"`` one per line, about 600-1200
characters, so a causal LM learns the dialogue form.

First a central held-out part is set aside that no client ever trains on: ``central_heldout``
whole plays, or (user data, ``central_heldout > 0``) a ``USER_CENTRAL_FRACTION`` of each file's
distinct records; every copy of a held-out record, in any file, is kept out of training (a
repeated record would otherwise leak into it). The rest is dealt to ``num_partitions`` clients:

* ``"play"`` — whole plays, round-robin after a seeded shuffle (LEAF's natural non-IID split);
* ``"character"`` — each (play, character) with at least ``MIN_CHARACTER_CHARS`` of speech is a
  user, with only that character's speeches; users are dealt round-robin after a seeded shuffle;
* ``"iid"`` — all samples shuffled and split evenly;
* ``"dirichlet"`` — each group's samples are split among clients in Dirichlet(alpha) proportions
  (contiguous runs), so small alpha gives clients few dominant plays.

For user files, ``"play"`` and ``"character"`` fall back to contiguous chunks per file: each file is
cut into ``num_partitions`` contiguous runs and client ``i`` gets run ``i`` of every file.

Each client's samples (optionally capped at ``max_samples_per_client``, a seeded subset kept in
order) end with its held-out tail: the last ``heldout_fraction`` of its distinct samples, at least
one, with their copies taken out of its training part (a client whose samples are all one record
has no held-out tail).
Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from collm_fl.data.files import SUFFIXES, cut_text, format_records, load_records, pack_text
from collm_fl.data.shakespeare import load_plays
from collm_fl.data.types import ClientData, TextSample
from collm_fl.errors import ConfigError

if TYPE_CHECKING:  # transformers is heavy; only the type is needed here
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PARTITIONINGS = ("play", "character", "iid", "dirichlet")
SHAKESPEARE = "shakespeare"
SPEECH_SAMPLE_CHARS = (600, 1200)  # min, max characters of one sample of consecutive speeches
MIN_CHARACTER_CHARS = 2000  # a character needs this much speech to be a "character" user
USER_CENTRAL_FRACTION = 0.1  # share of each user file's records kept for the central held-out set
_DIRICHLET_TRIES = 100  # redraws until every client gets at least two samples
# Independent random streams derived from the seed, one per decision.
_CENTRAL, _ASSIGN, _CAP, _CENTRAL_CAP = 1, 2, 3, 4

Group = tuple[str, list[TextSample]]  # (name, ordered samples): a play, a character, a file


@dataclass(frozen=True)
class DataSpec:
    """Which data a run trains on and how it is split across clients."""

    source: str = SHAKESPEARE  # "shakespeare", or a path to a user data file or folder
    partitioning: str = "play"  # one of PARTITIONINGS
    dirichlet_alpha: float = 0.5  # concentration for "dirichlet": small = skewed clients
    heldout_fraction: float = 0.1  # tail of each client's samples kept for its local evaluation
    central_heldout: int = (
        2  # plays for the server's held-out set (user data: >0 = 10 % of records)
    )
    max_samples_per_client: int | None = None  # cap on a client's samples (None or 0 = all)
    seed: int = 0  # every shuffle and draw derives from this

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.source.strip():
            problems.append("data must be 'shakespeare' or a path; got ''")
        if self.partitioning not in PARTITIONINGS:
            problems.append(
                f"partitioning must be one of {', '.join(PARTITIONINGS)}; got {self.partitioning!r}"
            )
        if not (math.isfinite(self.dirichlet_alpha) and self.dirichlet_alpha > 0):
            problems.append(f"dirichlet-alpha must be > 0; got {self.dirichlet_alpha}")
        if not 0 <= self.heldout_fraction < 1:
            problems.append(f"heldout-fraction must be in [0, 1); got {self.heldout_fraction}")
        if self.central_heldout < 0:
            problems.append(f"central-heldout must be >= 0; got {self.central_heldout}")
        if self.max_samples_per_client is not None and self.max_samples_per_client < 0:
            problems.append(
                f"max-samples-per-client must be >= 0 (0 = all); got {self.max_samples_per_client}"
            )
        if self.seed < 0:
            problems.append(f"seed must be >= 0; got {self.seed}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def is_shakespeare(self) -> bool:
        return self.source == SHAKESPEARE


def speech_samples(speeches: list[tuple[str, str]]) -> list[TextSample]:
    """Group consecutive speeches into ``"CHARACTER: speech"`` samples of 600-1200 characters.

    A speech too long for one sample is cut at whitespace, each part keeping its speaker prefix.
    """
    low, high = SPEECH_SAMPLE_CHARS
    lines = [
        f"{who}: {part}"
        for who, speech in speeches
        for part in cut_text(speech, high - len(who) - 2)
    ]
    return [TextSample(text=text) for text in pack_text(lines, low, high, "\n")]


def _rng(spec: DataSpec, *stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, *stream])


def _name_key(name: str) -> int:
    """A stream number of a file name, the same in every process (``hash()`` is salted)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def _central_play_ids(play_ids: list[str], spec: DataSpec) -> list[str]:
    """The plays kept for the central held-out set: a seeded choice, the same for every caller."""
    if spec.central_heldout >= len(play_ids):
        raise ConfigError(
            f"central-heldout must be less than the number of plays ({len(play_ids)}); "
            f"got {spec.central_heldout}"
        )
    order = _rng(spec, _CENTRAL).permutation(len(play_ids))
    return sorted(play_ids[i] for i in order[: spec.central_heldout])


def _user_files(spec: DataSpec) -> list[Path]:
    path = Path(spec.source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise ConfigError(f"data folder {path} holds no {'/'.join(SUFFIXES)} files")
        return files
    raise ConfigError(f"data must be 'shakespeare' or an existing file or folder; got {path}")


def _user_split(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[list[Group], list[TextSample]]:
    """User files as groups for clients, and the records set aside for the central held-out."""
    groups: list[Group] = []
    central: list[TextSample] = []
    for path in _user_files(spec):
        samples = format_records(load_records(path), tokenizer, str(path))
        distinct = list(dict.fromkeys(samples))  # a repeated record is held out whole or not
        if spec.central_heldout > 0 and len(distinct) >= 2:
            k = max(1, round(len(distinct) * USER_CENTRAL_FRACTION))
            # Seeded by the file's name, not its place in the folder: a host whose copy of the
            # folder holds one file more or less still sets aside the same records of this one.
            picked = _rng(spec, _CENTRAL, _name_key(path.name)).choice(len(distinct), k, False)
            central.extend(distinct[int(i)] for i in sorted(picked))
        groups.append((path.stem, samples))
    central = list(dict.fromkeys(central))
    held = set(central)  # no copy of a held-out record trains, from this file or another
    return [(name, [s for s in samples if s not in held]) for name, samples in groups], central


def _deal(units: list[Group], num_partitions: int, spec: DataSpec, what: str) -> list[list[Group]]:
    """Round-robin whole units (plays, characters) to clients after a seeded shuffle."""
    if num_partitions > len(units):
        hint = "; try partitioning='character'" if what == "plays" else ""
        raise ConfigError(
            f"num_partitions ({num_partitions}) exceeds the number of {what} ({len(units)}) "
            f"for partitioning={spec.partitioning!r}{hint}"
        )
    order = _rng(spec, _ASSIGN).permutation(len(units))
    shuffled = [units[i] for i in order]
    return [shuffled[i::num_partitions] for i in range(num_partitions)]


def _iid(groups: list[Group], num_partitions: int, spec: DataSpec) -> list[list[TextSample]]:
    pool = [s for _, samples in groups for s in samples]
    order = _rng(spec, _ASSIGN).permutation(len(pool))
    return [[pool[i] for i in part] for part in np.array_split(order, num_partitions)]


def _dirichlet(groups: list[Group], num_partitions: int, spec: DataSpec) -> list[list[TextSample]]:
    """Split each group among clients in Dirichlet(alpha) proportions, as contiguous runs."""
    rng = _rng(spec, _ASSIGN)
    for _ in range(_DIRICHLET_TRIES):
        clients: list[list[TextSample]] = [[] for _ in range(num_partitions)]
        for _, samples in groups:
            shares = rng.dirichlet(np.full(num_partitions, spec.dirichlet_alpha))
            cuts = np.round(np.cumsum(shares) * len(samples)).astype(int)
            start = 0
            for client, end in zip(clients, cuts, strict=True):
                client.extend(samples[start:end])
                start = end
        if min(len(c) for c in clients) >= 2:
            return clients
    raise ConfigError(
        f"dirichlet_alpha={spec.dirichlet_alpha} leaves some of the {num_partitions} clients "
        "without data; raise dirichlet_alpha or lower num_partitions"
    )


def _per_file_runs(groups: list[Group], num_partitions: int) -> list[list[TextSample]]:
    clients: list[list[TextSample]] = [[] for _ in range(num_partitions)]
    for _, samples in groups:
        for client, part in zip(
            clients, np.array_split(np.arange(len(samples)), num_partitions), strict=True
        ):
            client.extend(samples[i] for i in part)
    return clients


def _character_users(plays: dict[str, list[tuple[str, str]]]) -> list[Group]:
    users: list[Group] = []
    for play_id, speeches in plays.items():
        by_character: dict[str, list[tuple[str, str]]] = {}
        for who, speech in speeches:
            by_character.setdefault(who, []).append((who, speech))
        for who, own in sorted(by_character.items()):
            if sum(len(s) for _, s in own) >= MIN_CHARACTER_CHARS:
                users.append((f"{who}@{play_id}", speech_samples(own)))
    return users


def _name_of(groups: list[Group]) -> str:
    names = [name for name, _ in groups]
    return names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"


def _client_samples(
    spec: DataSpec,
    partition_id: int,
    num_partitions: int,
    tokenizer: PreTrainedTokenizerBase | None,
) -> tuple[str, list[TextSample]]:
    """The name and the ordered samples of one client, before capping and the held-out split."""
    if spec.is_shakespeare:
        plays = load_plays()
        central = set(_central_play_ids(sorted(plays), spec))
        plays = {pid: speeches for pid, speeches in plays.items() if pid not in central}
        if spec.partitioning in ("play", "character"):
            units = (
                [(pid, speech_samples(s)) for pid, s in plays.items()]
                if spec.partitioning == "play"
                else _character_users(plays)
            )
            what = "plays" if spec.partitioning == "play" else "characters"
            mine = _deal(units, num_partitions, spec, what)[partition_id]
            return _name_of(mine), [s for _, samples in mine for s in samples]
        groups = [(pid, speech_samples(s)) for pid, s in plays.items()]
    else:
        groups, _ = _user_split(spec, tokenizer)
    if spec.partitioning == "iid":
        clients = _iid(groups, num_partitions, spec)
    elif spec.partitioning == "dirichlet":
        clients = _dirichlet(groups, num_partitions, spec)
    else:  # "play" / "character" on user files: contiguous runs of every file
        clients = _per_file_runs(groups, num_partitions)
    prefix = SHAKESPEARE if spec.is_shakespeare else Path(spec.source).name
    return f"{prefix}-{spec.partitioning}-{partition_id}", clients[partition_id]


def _subsample(
    samples: list[TextSample], limit: int | None, rng: np.random.Generator
) -> list[TextSample]:
    """At most ``limit`` samples, a seeded choice kept in their original order."""
    if limit is None or len(samples) <= limit:
        return samples
    keep = np.sort(rng.choice(len(samples), limit, replace=False))
    return [samples[int(i)] for i in keep]


def _heldout_tail(
    samples: list[TextSample], fraction: float
) -> tuple[list[TextSample], list[TextSample]]:
    """(train, held-out): the last ``fraction`` of the distinct samples (at least one, in order of
    first appearance) held out, one copy each, and none of their copies in the training part."""
    distinct = list(dict.fromkeys(samples))
    if fraction <= 0 or len(distinct) < 2:
        return samples, []
    n_held = min(len(distinct) - 1, max(1, round(len(distinct) * fraction)))
    heldout = distinct[len(distinct) - n_held :]
    held = set(heldout)
    return [s for s in samples if s not in held], heldout


def load_client_data(
    spec: DataSpec,
    partition_id: int,
    num_partitions: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> ClientData:
    """Client ``partition_id``'s train samples and held-out tail, out of ``num_partitions``.

    Clients are disjoint and never see the central held-out data. ``tokenizer`` formats chat and
    instruction records of user files with its chat template (see `format_records`); without one
    they use the plain fallback template.
    """
    if num_partitions < 1:
        raise ConfigError(f"num_partitions must be >= 1; got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition_id must be in [0, {num_partitions}); got {partition_id}")
    name, samples = _client_samples(spec, partition_id, num_partitions, tokenizer)
    cap = spec.max_samples_per_client or None
    samples = _subsample(samples, cap, _rng(spec, _CAP, partition_id))
    if not samples:
        raise ConfigError(
            f"partition {partition_id} of {num_partitions} gets no data from {spec.source!r}; "
            "lower num_partitions or add data"
        )
    train, heldout = _heldout_tail(samples, spec.heldout_fraction)
    if spec.heldout_fraction > 0 and not heldout:
        logger.warning(
            "partition %d/%d has no held-out split: its %d sample(s) hold one distinct record",
            partition_id,
            num_partitions,
            len(samples),
        )
    logger.info(
        "partition %d/%d (%s): %d train, %d held-out samples",
        partition_id,
        num_partitions,
        name,
        len(train),
        len(heldout),
    )
    return ClientData(train=train, heldout=heldout, name=name)


def load_central_heldout(
    spec: DataSpec,
    max_samples: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[TextSample]:
    """The server's held-out samples, which no client trains on (empty if ``central_heldout=0``).

    ``max_samples`` keeps a seeded subset in order, spread over the whole held-out set.
    """
    if spec.is_shakespeare:
        plays = load_plays()
        held_ids = _central_play_ids(sorted(plays), spec)
        samples = [s for pid in held_ids for s in speech_samples(plays[pid])]
        logger.info("central held-out plays: %s", ", ".join(held_ids) or "none")
    else:
        _, samples = _user_split(spec, tokenizer)
    if not samples:
        logger.warning(
            "the central held-out set is empty (central_heldout=%d)", spec.central_heldout
        )
    return _subsample(samples, max_samples, _rng(spec, _CENTRAL_CAP))
