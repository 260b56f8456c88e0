"""Tests of course_lib.data: tokenizer, tasks, fixed splits, batches with answer-only masks."""

from __future__ import annotations

import itertools

import pytest
import torch

from course_lib.data import (
    N_VALIDATION_PAIRS,
    TOKENIZER,
    CharTokenizer,
    Example,
    iterate_batches,
    make_batch,
    make_example,
    make_split,
    operand_pools,
    sample_examples,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tokenizer_round_trip_and_special_ids():
    tok = CharTokenizer()
    text = "0123456789+-="
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.pad_id == 0 and tok.eos_id == 1
    assert tok.vocab_size == 15
    assert 0 not in ids and 1 not in ids  # characters never collide with pad/eos
    with_eos = tok.encode("12", eos=True)
    assert with_eos[-1] == tok.eos_id
    assert tok.decode(with_eos + tok.encode("99")) == "12"  # decoding stops at <eos>
    assert tok.decode(with_eos + tok.encode("99"), stop_at_eos=False) == "1299"
    assert tok.decode([tok.pad_id, *tok.encode("7"), tok.pad_id]) == "7"  # padding dropped
    assert tok.decode(torch.tensor(tok.encode("42"))) == "42"


def test_tokenizer_rejects_unknown_characters_and_ids():
    with pytest.raises(ValueError, match=r"'x'.*allowed characters"):
        TOKENIZER.encode("1x2")
    with pytest.raises(ValueError, match="out of range"):
        TOKENIZER.decode([99])
    assert TOKENIZER.decode([*TOKENIZER.encode("1"), 99], strict=False) == "1?"
    with pytest.raises(ValueError, match="repeat"):
        CharTokenizer("0012")


def test_examples_of_both_tasks():
    assert make_example("addition", 358, 267) == Example("358+267=", "0625")
    assert make_example("carryless_addition", 358, 267) == Example("358+267=", "0515")
    assert make_example("addition", 999, 999).answer == "1998"
    assert make_example("carryless_addition", 999, 999).answer == "0888"
    assert make_example("carryless_addition", 0, 0).answer == "0000"
    # without any carry the two tasks agree
    assert make_example("carryless_addition", 123, 456) == make_example("addition", 123, 456)
    assert make_example("addition", 7, 8).text == "007+008=0015"
    with pytest.raises(ValueError, match="task must be one of"):
        make_example("subtraction", 1, 2)
    with pytest.raises(ValueError, match="operand a"):
        make_example("addition", 1000, 2)
    with pytest.raises(ValueError, match="operand b"):
        make_example("addition", 1, -1)
    with pytest.raises(TypeError, match="operand a must be a non-negative int"):
        make_example("addition", 1.0, 2)


def test_operand_pools_partition_all_pairs():
    train_pool, val_pool = operand_pools()
    assert len(val_pool) == N_VALIDATION_PAIRS
    assert len(train_pool) + len(val_pool) == 1000 * 1000
    codes = torch.cat([pool[:, 0] * 1000 + pool[:, 1] for pool in (train_pool, val_pool)])
    assert torch.equal(torch.sort(codes).values, torch.arange(1000 * 1000))


def test_splits_are_fixed_by_seed_and_disjoint():
    train_a, val_a = make_split("carryless_addition", 300, 100, seed=3)
    train_b, val_b = make_split("carryless_addition", 300, 100, seed=3)
    train_c, val_c = make_split("carryless_addition", 300, 100, seed=4)
    assert train_a == train_b and val_a == val_b
    assert train_a != train_c
    assert val_a == val_c  # every seed is scored on the same validation questions
    assert not {e.prompt for e in train_a} & {e.prompt for e in val_a}
    assert len({e.prompt for e in train_a}) == 300  # drawn without replacement
    # the two tasks ask the same validation questions, with differently formatted answers
    _, val_add = make_split("addition", 0, 100)
    assert [e.prompt for e in val_add] == [e.prompt for e in val_a]
    same = sum(a.answer == b.answer for a, b in zip(val_add, val_a))
    assert 5 <= same <= 35  # they agree only when no column carries (about 17 % of questions)


def test_first_examples_are_pinned():
    # Pinned so that a change of the split (which would silently change every accuracy quoted in
    # the notebooks and the pretrained weights) is noticed.
    _, val = make_split("addition", 0, 3)
    assert [e.text for e in val] == ["569+775=1344", "451+309=0760", "942+150=1092"]
    train, _ = make_split("carryless_addition", 2, 0, seed=0)
    assert [e.text for e in train] == ["627+374=0991", "025+207=0222"]


def test_sampled_examples_come_from_the_training_pool():
    gen = torch.Generator().manual_seed(0)
    sample = sample_examples("addition", 500, gen)
    _, val = make_split("addition", 0, N_VALIDATION_PAIRS)
    assert not {e.prompt for e in sample} & {e.prompt for e in val}
    again = sample_examples("addition", 500, torch.Generator().manual_seed(0))
    assert sample == again
    with pytest.raises(ValueError, match="n must be a positive int"):
        sample_examples("addition", 0, gen)
    with pytest.raises(ValueError, match="n_train must be a non-negative int"):
        make_split("addition", -1, 10)
    with pytest.raises(TypeError, match="n_val must be a non-negative int"):
        make_split("addition", 10, 2.5)
    with pytest.raises(ValueError, match=f"n_val must be at most {N_VALIDATION_PAIRS}"):
        make_split("addition", 10, N_VALIDATION_PAIRS + 1)


def test_batch_masks_exactly_the_answer_and_eos_targets():
    examples = [Example("12+3=", "15"), Example("1+1=", "2")]
    batch = make_batch(examples)
    # longest sequence: "12+3=" + "15" + <eos> = 8 tokens -> T = 7
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (2, 7)
    assert batch.mask.dtype == torch.bool
    assert TOKENIZER.decode(batch.inputs[0]) == "12+3=15"
    assert TOKENIZER.decode(batch.targets[0][batch.mask[0]]) == "15"
    assert batch.targets[0][batch.mask[0]][-1] == TOKENIZER.eos_id
    assert batch.mask[0].tolist() == [False, False, False, False, True, True, True]
    assert batch.mask[1].tolist() == [False, False, False, True, True, False, False]
    assert batch.inputs[1, 5:].tolist() == [TOKENIZER.pad_id] * 2  # right padding
    assert batch.n_tokens == 5
    with pytest.raises(ValueError, match="must not be empty"):
        make_batch([])


def test_iterate_batches_is_seeded_and_covers_each_epoch():
    train, _ = make_split("addition", 40, 0)
    first = list(itertools.islice(iterate_batches(train, 10, seed=1), 4))
    again = list(itertools.islice(iterate_batches(train, 10, seed=1), 4))
    other = list(itertools.islice(iterate_batches(train, 10, seed=2), 4))
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(first, again))
    assert not all(torch.equal(a.inputs, b.inputs) for a, b in zip(first, other))
    epoch = torch.cat([b.inputs for b in first])
    expected = make_batch(train).inputs
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, expected.tolist()))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(train, 41))
    with pytest.raises(TypeError, match="batch_size must be a positive int"):
        next(iterate_batches(train, "10"))
