"""Sampling: parameter validation, greedy, temperature/top-p against NumPy, per-request streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collm_fl.replica.sampling import (
    SamplingParams,
    emittable_length,
    find_stop,
    make_generator,
    sample_next,
)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_tokens", {"max_tokens": 0}),
        ("max_tokens", {"max_tokens": 2.5}),
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": float("nan")}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("stop", {"stop": ["x"]}),
        ("stop", {"stop": ("",)}),
        ("seed", {"seed": 1.5}),
    ],
)
def test_invalid_params_name_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0)] * 3
    got = sample_next(logits, params, [None] * 3)
    assert got.tolist() == logits.argmax(-1).tolist()


def empirical(logits: torch.Tensor, params: SamplingParams, n: int = 20000) -> np.ndarray:
    gen = make_generator(params)
    counts = np.zeros(logits.shape[-1])
    for _ in range(n):
        counts[int(sample_next(logits[None], [params], [gen])[0])] += 1
    return counts / n


def test_temperature_sampling_matches_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=0.7, seed=1)
    p = np.exp(logits.numpy() / 0.7)
    np.testing.assert_allclose(empirical(logits, params), p / p.sum(), atol=0.015)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = torch.tensor(np.log(probs), dtype=torch.float32)
    freq = empirical(logits, SamplingParams(temperature=1.0, top_p=0.6, seed=2))
    # mass before token 1 is 0.5 < 0.6 (kept); before token 2 it is 0.8 (dropped)
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    tiny_p = empirical(logits, SamplingParams(temperature=1.0, top_p=0.01, seed=3), n=200)
    assert tiny_p[0] == 1.0


def test_seeded_stream_is_independent_of_batch_composition() -> None:
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(4, 30, generator=gen) for _ in range(20)]
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    other = SamplingParams(temperature=1.2, seed=7)

    def run(batched: bool) -> list[int]:
        g_mine, g_other = make_generator(mine), make_generator(other)
        out = []
        for logits in steps:
            if batched:
                rows = [other, mine, SamplingParams(temperature=0.0), other]
                gens = [g_other, g_mine, None, make_generator(other)]
                out.append(int(sample_next(logits, rows, gens)[1]))
            else:
                out.append(int(sample_next(logits[1:2], [mine], [g_mine])[0]))
        return out

    assert run(batched=False) == run(batched=True)
    assert len(set(run(batched=False))) > 1


def test_sampling_row_without_generator_is_rejected() -> None:
    with pytest.raises(ValueError, match="generator"):
        sample_next(torch.zeros(1, 4), [SamplingParams(temperature=1.0)], [None])


def test_stop_strings_are_found_and_their_prefixes_held_back() -> None:
    assert find_stop("hello world", ("wor", "lo"), sent=0) == 3
    assert find_stop("hello", ("xyz",), sent=0) is None
    assert emittable_length("hello wo", ("world",), sent=0) == len("hello ")
    assert emittable_length("hello wx", ("world",), sent=0) == len("hello wx")
    assert emittable_length("abc\ufffd", (), sent=0) == 3  # incomplete UTF-8 waits
    assert emittable_length("abc\ufffd", (), sent=3) == 3
