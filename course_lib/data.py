"""Deterministic synthetic tasks and a character-level tokenizer for TinyGPT.

Two tasks ask the same questions, sums of two 3-digit numbers written with leading zeros, and
differ in the rule for the 4-digit answer:

- **addition** (pretraining):             ``"358+267="`` -> ``"0625"`` (ordinary sum, with carries)
- **carryless_addition** (adaptation):    ``"358+267="`` -> ``"0515"`` (each column on its own,
  ``(x + y) mod 10``, carries dropped: 3+2=5, 5+6=11 -> 1, 8+7=15 -> 5)

The adaptation task is a small, targeted change of a skill the pretrained model has: it already
adds the digits of each column and only has to stop carrying. Before fine-tuning it answers
correctly exactly the questions in which no column carries (about 17 %), so exact-match
accuracy shows clearly how much fine-tuning (full or LoRA) changed.

Every operand pair ``(a, b)`` with ``0 <= a, b < 1000`` belongs to exactly one pool: a fixed
permutation (seed :data:`POOL_SEED`) puts the first :data:`N_VALIDATION_PAIRS` pairs in the
validation pool, the rest in the training pool. Pretraining and fine-tuning both draw their
training examples from the training pool, so no validation question is ever trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from course_lib.validation import check_choice, non_negative_int, positive_int

__all__ = [
    "CharTokenizer",
    "TOKENIZER",
    "Example",
    "Batch",
    "TASKS",
    "PRETRAIN_TASK",
    "ADAPT_TASK",
    "N_DIGITS",
    "POOL_SEED",
    "N_VALIDATION_PAIRS",
    "make_example",
    "operand_pools",
    "make_split",
    "sample_examples",
    "make_batch",
    "iterate_batches",
]

N_DIGITS = 3  # operands are 3-digit numbers written with leading zeros: 000 ... 999
POOL_SEED = 1234  # seed of the permutation that splits the operand pairs into train/validation
N_VALIDATION_PAIRS = 4096  # operand pairs reserved for validation (never trained on)
TASKS = ("addition", "carryless_addition")
PRETRAIN_TASK = "addition"
ADAPT_TASK = "carryless_addition"


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character, plus ``<pad>`` (id 0) and ``<eos>`` (id 1).

    >>> tok = CharTokenizer()
    >>> tok.decode(tok.encode("12+34=0046", eos=True))
    '12+34=0046'
    """

    PAD = "<pad>"
    EOS = "<eos>"

    def __init__(self, alphabet: str = "0123456789+-=") -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must not repeat characters, got {alphabet!r}")
        self.alphabet = alphabet
        self.itos: list[str] = [self.PAD, self.EOS, *alphabet]
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        self.pad_id = 0
        self.eos_id = 1

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, eos: bool = False) -> list[int]:
        """Token ids of ``text``; append ``<eos>`` if ``eos``."""
        ids = []
        for ch in text:
            if len(ch) != 1 or ch not in self.alphabet:
                raise ValueError(
                    f"cannot encode character {ch!r}: allowed characters are {self.alphabet!r}"
                )
            ids.append(self.stoi[ch])
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(
        self, ids: Sequence[int] | torch.Tensor, stop_at_eos: bool = True, strict: bool = True
    ) -> str:
        """Text of ``ids``: padding is dropped; decoding stops at the first ``<eos>``.

        An id outside the vocabulary raises ``ValueError``, or with ``strict=False`` becomes
        ``"?"`` (a model whose output layer is larger than the vocabulary can emit such ids).
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                if not strict:
                    out.append("?")
                    continue
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            if i == self.eos_id:
                if stop_at_eos:
                    break
                continue
            if i == self.pad_id:
                continue
            out.append(self.itos[i])
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, alphabet={self.alphabet!r})"


TOKENIZER = CharTokenizer()


# --------------------------------------------------------------------------------------------
# Tasks and splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One question: the model reads ``prompt`` and must write ``answer`` followed by ``<eos>``."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def make_example(task: str, a: int, b: int) -> Example:
    """The ``task`` question about operands ``a`` and ``b`` (``0 <= a, b < 1000``)."""
    check_choice("task", task, TASKS)
    limit = 10**N_DIGITS
    for name, value in (("a", a), ("b", b)):
        if non_negative_int(f"operand {name}", value) >= limit:
            raise ValueError(f"operand {name} must be an int in [0, {limit}), got {value!r}")
    sa, sb = f"{a:0{N_DIGITS}d}", f"{b:0{N_DIGITS}d}"
    if task == "addition":
        answer = f"{a + b:0{N_DIGITS + 1}d}"
    else:  # carry-less: every column on its own, (x + y) mod 10, and no carry out of the top
        answer = "0" + "".join(str((int(x) + int(y)) % 10) for x, y in zip(sa, sb))
    return Example(f"{sa}+{sb}=", answer)


_POOLS: tuple[torch.Tensor, torch.Tensor] | None = None


def operand_pools() -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_pairs, val_pairs)``: disjoint ``(n, 2)`` int64 tensors of operand pairs.

    Fixed by :data:`POOL_SEED`; every pair of 3-digit operands is in exactly one pool.
    """
    global _POOLS
    if _POOLS is None:
        limit = 10**N_DIGITS
        gen = torch.Generator().manual_seed(POOL_SEED)
        perm = torch.randperm(limit * limit, generator=gen)
        pairs = torch.stack([perm // limit, perm % limit], dim=1)  # (limit**2, 2)
        _POOLS = (pairs[N_VALIDATION_PAIRS:], pairs[:N_VALIDATION_PAIRS])
    return _POOLS


def _examples(task: str, pairs: torch.Tensor) -> list[Example]:
    return [make_example(task, a, b) for a, b in pairs.tolist()]


def make_split(
    task: str, n_train: int, n_val: int, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """A fixed ``(train, val)`` split of ``task`` with ``n_train`` and ``n_val`` examples.

    ``seed`` chooses which training-pool pairs form the training set (the same seed always
    gives the same examples). Validation examples are the first ``n_val`` pairs of the
    validation pool, so every seed and every task is scored on the same questions.
    """
    check_choice("task", task, TASKS)
    non_negative_int("n_train", n_train)
    non_negative_int("n_val", n_val)
    train_pool, val_pool = operand_pools()
    if n_val > len(val_pool):
        raise ValueError(f"n_val must be at most {len(val_pool)}, got {n_val}")
    if n_train > len(train_pool):
        raise ValueError(f"n_train must be at most {len(train_pool)}, got {n_train}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_pool), generator=gen)[:n_train]
    return _examples(task, train_pool[idx]), _examples(task, val_pool[:n_val])


def sample_examples(task: str, n: int, generator: torch.Generator) -> list[Example]:
    """``n`` examples drawn with replacement from the training pool (for pretraining)."""
    check_choice("task", task, TASKS)
    positive_int("n", n)
    train_pool, _ = operand_pools()
    idx = torch.randint(len(train_pool), (n,), generator=generator)
    return _examples(task, train_pool[idx])


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Model inputs and next-token targets; ``mask`` marks the answer tokens (and ``<eos>``).

    All three are ``(B, T)``: ``inputs`` and ``targets`` are int64, ``mask`` is bool. The loss
    counts only masked positions, so the model is never trained to predict the question.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    @property
    def n_tokens(self) -> int:
        """Number of tokens the loss counts."""
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.mask.to(device))

    def __len__(self) -> int:
        return self.inputs.size(0)


def make_batch(examples: Sequence[Example], tokenizer: CharTokenizer = TOKENIZER) -> Batch:
    """Tokenise ``prompt + answer + <eos>`` and right-pad with ``tokenizer.pad_id``.

    ``inputs = seq[:-1]``, ``targets = seq[1:]``; ``mask`` is true where the target is an
    answer token or the final ``<eos>``.
    """
    if len(examples) == 0:
        raise ValueError("examples must not be empty")
    seqs, starts = [], []
    for ex in examples:
        prompt = tokenizer.encode(ex.prompt)
        if not prompt:
            raise ValueError("every example needs a non-empty prompt")
        seqs.append(prompt + tokenizer.encode(ex.answer, eos=True))
        starts.append(len(prompt))
    T = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        n = len(seq) - 1
        inputs[i, :n] = torch.tensor(seq[:-1])
        targets[i, :n] = torch.tensor(seq[1:])
        # the target at position t is token t + 1, so the answer's targets start at start - 1
        mask[i, start - 1 : n] = True
    return Batch(inputs, targets, mask)


def iterate_batches(
    examples: Sequence[Example],
    batch_size: int,
    seed: int = 0,
    tokenizer: CharTokenizer = TOKENIZER,
) -> Iterator[Batch]:
    """Endless stream of shuffled batches: each epoch is a fresh seeded permutation.

    A short last batch of an epoch is skipped, so every batch has ``batch_size`` examples.
    """
    positive_int("batch_size", batch_size)
    if len(examples) < batch_size:
        raise ValueError(
            f"batch_size ({batch_size}) must not exceed the number of examples ({len(examples)})"
        )
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield make_batch([examples[i] for i in order[start : start + batch_size]], tokenizer)
