"""Pooling modes against hand computations on a small right-padded batch."""

from __future__ import annotations

import pytest
import torch

from encoders.core.pooling import POOLING_MODES, check_pooling, pool_tokens

PAD = 1000.0  # padded positions hold huge values: any leak shows up in every mode


@pytest.fixture()
def batch():
    """(3, 4, 2) hidden states, right-padded to lengths 3, 1 and 4."""
    hidden = torch.tensor(
        [
            [[1.0, -2.0], [3.0, 0.0], [5.0, 4.0], [PAD, PAD]],
            [[-1.0, 7.0], [PAD, PAD], [PAD, PAD], [PAD, PAD]],
            [[0.0, 1.0], [2.0, -3.0], [-4.0, 5.0], [6.0, -7.0]],
        ]
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    lengths = torch.tensor([3, 1, 4])
    return hidden, mask, lengths


# Worked out by hand from the batch above.
EXPECTED = {
    "mean": [[(1 + 3 + 5) / 3, (-2 + 0 + 4) / 3], [-1.0, 7.0], [(0 + 2 - 4 + 6) / 4, (1 - 3 + 5 - 7) / 4]],
    "cls": [[1.0, -2.0], [-1.0, 7.0], [0.0, 1.0]],
    "max": [[5.0, 4.0], [-1.0, 7.0], [6.0, 5.0]],
    "last": [[5.0, 4.0], [-1.0, 7.0], [6.0, -7.0]],
}


def test_every_mode_has_a_hand_computed_case():
    assert set(EXPECTED) == set(POOLING_MODES)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_matches_hand_computation(batch, mode):
    hidden, mask, lengths = batch
    pooled = pool_tokens(hidden, mask, lengths, mode)
    assert pooled.shape == (3, 2)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.tensor(EXPECTED[mode]), rtol=0, atol=1e-6)


def test_max_ignores_padding_even_when_all_real_values_are_negative():
    hidden = torch.tensor([[[-5.0, -1.0], [-2.0, -9.0], [0.0, 0.0]]])  # padding is 0 > real values
    mask = torch.tensor([[1, 1, 0]])
    pooled = pool_tokens(hidden, mask, torch.tensor([2]), "max")
    torch.testing.assert_close(pooled, torch.tensor([[-2.0, -1.0]]))


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_half_precision_states_pool_in_float32(batch, mode):
    hidden, mask, lengths = batch
    pooled = pool_tokens(hidden.to(torch.bfloat16), mask, lengths, mode)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.tensor(EXPECTED[mode]), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_check_pooling_accepts_valid_modes(mode):
    assert check_pooling(mode) == mode


@pytest.mark.parametrize("bad", ["avg", "MEAN", "", "mean_sqrt_len"])
def test_unknown_mode_lists_the_valid_modes(batch, bad):
    hidden, mask, lengths = batch
    for call in (lambda: check_pooling(bad), lambda: pool_tokens(hidden, mask, lengths, bad)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert repr(bad) in message
        assert all(mode in message for mode in POOLING_MODES)
