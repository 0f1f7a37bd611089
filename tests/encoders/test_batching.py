"""Dynamic padding: micro-batch plans under a token budget, on real token lengths and edge cases."""

from __future__ import annotations

import random

import pytest

from encoders.core.batching import plan_micro_batches

MAX_LENGTH = 256  # MiniLM's max_seq_length: what the encoder sees after truncation


@pytest.fixture(scope="module")
def real_lengths(minilm_path, real_texts) -> list[int]:
    """Token lengths of real paragraphs under the MiniLM tokenizer (untruncated, some > 256)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    lengths = [len(ids) for ids in tokenizer(real_texts, verbose=False)["input_ids"]]
    assert max(lengths) > MAX_LENGTH and min(lengths) < 32, "expected a spread of lengths"
    return lengths


def padded_tokens(lengths, batches) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def check_plan(lengths, batches, max_tokens, max_rows=None) -> None:
    """Every property a plan must have; raises AssertionError naming the one that fails."""
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    assert all(batches), "no empty batch"
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) * longest <= max_tokens or len(b) == 1, f"batch over budget: {b}"
        assert lengths[b[0]] == longest, "a batch's first row is its longest"
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        if max_rows is not None:
            assert len(b) <= max_rows
    flat_lengths = [lengths[i] for i in flat]
    assert flat_lengths == sorted(flat_lengths, reverse=True), "longest first across batches"
    # Not wasteful: no worse than cutting greedily by the budget alone, under the planner's own
    # cost (padded tokens plus a fixed cost per forward call). A plan of singletons has zero
    # padding but pays the per-call cost for every row, so it fails here.
    overhead = max_tokens // 64
    assert plan_cost(lengths, batches, overhead) <= plan_cost(
        lengths, greedy_plan(lengths, max_tokens, max_rows), overhead
    )


def greedy_plan(lengths, max_tokens, max_rows=None) -> list[list[int]]:
    """The reference: sort longest first, cut only when the budget or max_rows would break."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > max_tokens or (max_rows and len(current) >= max_rows)):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def plan_cost(lengths, batches, overhead) -> int:
    return padded_tokens(lengths, batches) + overhead * len(batches)


def test_singletons_are_not_a_plan():
    lengths = [100] * 64
    batches = plan_micro_batches(lengths, 8192)
    assert len(batches) == 1, "equal lengths that fit the budget belong in one batch"


@pytest.mark.parametrize("max_tokens", [64, 256, 512, 2048, 8192, 100_000])
def test_plan_on_real_lengths(real_lengths, max_tokens):
    batches = plan_micro_batches(real_lengths, max_tokens)
    check_plan(real_lengths, batches, max_tokens)
    singles_over_budget = [b for b in batches if real_lengths[b[0]] > max_tokens]
    assert all(len(b) == 1 for b in singles_over_budget)


@pytest.mark.parametrize("max_tokens", [512, 2048, 8192])
def test_plan_on_truncated_real_lengths(real_lengths, max_tokens):
    lengths = [min(n, MAX_LENGTH) for n in real_lengths]
    batches = plan_micro_batches(lengths, max_tokens)
    check_plan(lengths, batches, max_tokens)
    assert all(len(b) * lengths[b[0]] <= max_tokens for b in batches)  # nothing is over-long now


def test_padding_waste_is_small_on_real_lengths(real_lengths):
    lengths = [min(n, MAX_LENGTH) for n in real_lengths]
    real = sum(lengths)
    for max_tokens, limit in ((512, 0.05), (2048, 0.10)):
        batches = plan_micro_batches(lengths, max_tokens)
        waste = 1 - real / padded_tokens(lengths, batches)
        assert waste <= limit, f"max_tokens={max_tokens}: {waste:.1%} of the padded tokens are padding"
        # The same number of batches cut in input order (no sorting) wastes far more.
        size = -(-len(lengths) // len(batches))
        naive = [list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)]
        naive_waste = 1 - real / padded_tokens(lengths, naive)
        assert waste < naive_waste / 4


def test_padding_waste_is_small_at_the_default_budget(real_lengths):
    lengths = [min(n, MAX_LENGTH) for n in real_lengths]
    for seed in range(3):
        block = [lengths[i] for i in random.Random(seed).sample(range(len(lengths)), 256)]
        batches = plan_micro_batches(block, 8192)
        waste = 1 - sum(block) / padded_tokens(block, batches)
        assert waste <= 0.10, f"block {seed}: {waste:.1%} padding at max_tokens=8192"


@pytest.mark.parametrize("max_rows", [1, 3, 16])
def test_max_rows_is_respected(real_lengths, max_rows):
    lengths = [min(n, MAX_LENGTH) for n in real_lengths]
    batches = plan_micro_batches(lengths, 100_000, max_rows=max_rows)
    check_plan(lengths, batches, 100_000, max_rows)
    assert max(len(b) for b in batches) == max_rows
    assert len(batches) == -(-len(lengths) // max_rows)  # budget never binds here


def test_empty_input_gives_no_batches():
    assert plan_micro_batches([], 100) == []


def test_one_sequence():
    assert plan_micro_batches([7], 100) == [[0]]
    assert plan_micro_batches([700], 100) == [[0]]  # over-long still gets a batch


def test_all_equal_lengths_fill_the_budget_exactly():
    lengths = [10] * 25
    batches = plan_micro_batches(lengths, 100)
    check_plan(lengths, batches, 100)
    assert sorted(len(b) for b in batches) == [5, 10, 10]
    assert padded_tokens(lengths, batches) == sum(lengths)  # no padding at all


def test_over_long_sequences_are_singletons_and_the_rest_batch():
    lengths = [5, 300, 5, 250, 5, 5]
    batches = plan_micro_batches(lengths, 20)
    check_plan(lengths, batches, 20)
    assert batches[:2] == [[1], [3]]
    assert sorted(batches[2]) == [0, 2, 4, 5]


def test_zero_lengths_do_not_break_the_plan():
    lengths = [0, 3, 0, 1]
    batches = plan_micro_batches(lengths, 4)
    check_plan(lengths, batches, 4)


def test_plan_is_deterministic_and_stable_for_ties():
    lengths = [4, 9, 4, 9, 4]
    assert plan_micro_batches(lengths, 18) == plan_micro_batches(list(lengths), 18)
    assert plan_micro_batches(lengths, 18) == [[1, 3], [0, 2, 4]]


@pytest.mark.parametrize("max_tokens", [0, -1, -8192])
def test_invalid_budget_raises(max_tokens):
    with pytest.raises(ValueError, match=f"max_tokens must be >= 1, got {max_tokens}"):
        plan_micro_batches([1, 2, 3], max_tokens)


def test_invalid_budget_raises_even_for_empty_input():
    with pytest.raises(ValueError, match="max_tokens"):
        plan_micro_batches([], 0)


@pytest.mark.parametrize("max_rows", [0, -1])
def test_invalid_max_rows_raises(max_rows):
    with pytest.raises(ValueError, match="max_rows"):
        plan_micro_batches([1, 2, 3], 100, max_rows=max_rows)
