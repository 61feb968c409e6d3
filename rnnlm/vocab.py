"""The vocabulary: word ids, the rare-word rule (eq. 7 of the paper) and frequency classes.

Ids are ordered by descending training count, so every frequency class is a contiguous id range
and the output layer can read a class's weights as one block.

How a token is scored (the same rule everywhere: offline evaluation, the daemon, reports):

* a word of the vocabulary: its own output probability;
* a *rare* word (seen in training fewer than ``min_count`` times): the rare token's probability
  shared uniformly among all rare words, ``P(w) = y_rare / C_rare`` (eq. 7);
* an *OOV* word (never seen in training): ``<unk>``'s probability when the training text had an
  ``<unk>`` token (PTB and WikiText map unknown words to it), otherwise treated as one more rare
  word, ``y_rare / max(C_rare, 1)``. OOV tokens are counted in every report.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .corpus import EOS

RARE = "<rare>"
UNK = "<unk>"

# What kind of token a word was, as reported per token.
KNOWN, RARE_WORD, OOV = 0, 1, 2


@dataclass
class Vocabulary:
    words: list[str]  # id -> word, by descending training count
    counts: list[int]  # training count of each id (the rare token: all merged words together)
    rare_words: frozenset[str]  # words merged into the rare token
    num_classes: int
    class_rule: str = "frequency"  # how classes share the unigram mass: "frequency" or "sqrt" (see assign_classes)
    class_of: np.ndarray = field(init=False)  # id -> class
    class_start: np.ndarray = field(init=False)  # class -> first id
    class_end: np.ndarray = field(init=False)  # class -> one past the last id

    def __post_init__(self) -> None:
        self.index = {word: i for i, word in enumerate(self.words)}
        self.rare_id = self.index[RARE]
        self.unk_id = self.index.get(UNK)
        self.eos_id = self.index[EOS]
        self.class_of = assign_classes(self.counts, self.num_classes, self.class_rule)
        self.num_classes = int(self.class_of[-1]) + 1
        boundaries = np.searchsorted(self.class_of, np.arange(self.num_classes + 1))
        self.class_start = boundaries[:-1].astype(np.int32)
        self.class_end = boundaries[1:].astype(np.int32)
        # eq. 7 divides the rare token's probability among the rare words; an OOV counts as one more.
        self.log_rare_share = math.log(max(len(self.rare_words), 1))

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, tokens: Iterable[str], min_count: int = 1, num_classes: int = 100,
              class_rule: str = "frequency") -> "Vocabulary":
        """Count the training tokens; words seen fewer than `min_count` times merge into `<rare>`."""
        if min_count < 1:
            raise ValueError("min_count must be at least 1")
        counts = Counter(tokens)
        counts.pop(RARE, None)
        rare_words = frozenset(w for w, n in counts.items() if n < min_count and w != EOS)
        kept = {w: n for w, n in counts.items() if w not in rare_words}
        kept.setdefault(EOS, 0)
        # <rare> always exists so that any word has a probability, even with no rare words.
        kept[RARE] = sum(counts[w] for w in rare_words)
        order = sorted(kept, key=lambda w: -kept[w])  # stable: ties keep first-seen order
        return cls(order, [kept[w] for w in order], rare_words, num_classes, class_rule)

    def encode(self, tokens: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids for the network and, per token, KNOWN, RARE_WORD or OOV."""
        index = self.index
        ids = np.fromiter((index.get(t, -1) for t in tokens), dtype=np.int32)
        kinds = np.zeros(len(ids), dtype=np.int8)
        unknown = (ids < 0) | (ids == self.rare_id)
        if unknown.any():  # rare and OOV words are few: sort them out one by one
            tokens = list(tokens) if not isinstance(tokens, list) else tokens
            for i in np.flatnonzero(unknown):
                kinds[i] = RARE_WORD if tokens[i] in self.rare_words else OOV
            oov_id = self.rare_id if self.unk_id is None else self.unk_id
            ids[unknown] = np.where(kinds[unknown] == RARE_WORD, self.rare_id, oov_id)
        return ids, kinds

    def word_logprob_offset(self, kinds: np.ndarray) -> np.ndarray:
        """What to add to the network's ln P(token id) to get ln P(word): eq. 7's 1/C_rare share."""
        shared = kinds == RARE_WORD
        if self.unk_id is None:
            shared |= kinds == OOV
        return np.where(shared, -self.log_rare_share, 0.0)

    def to_state(self) -> dict:
        return {
            "words": list(self.words),
            "counts": list(self.counts),
            "rare_words": sorted(self.rare_words),
            "num_classes": self.num_classes,
            "class_rule": self.class_rule,
        }

    @classmethod
    def from_state(cls, state: dict) -> "Vocabulary":
        # Files written before class_rule existed used frequency classes.
        return cls(list(state["words"]), list(state["counts"]), frozenset(state["rare_words"]), int(state["num_classes"]),
                   str(state.get("class_rule", "frequency")))


CLASS_RULES = ("frequency", "sqrt")


def assign_classes(counts: list[int], num_classes: int, rule: str = "frequency") -> np.ndarray:
    """Assign classes by cumulative unigram mass, as the reference toolkit does.

    Words (already sorted by descending count) fill class 0 until it holds 1/C of the mass, then
    class 1, and so on: frequent words get small classes, rare words share big ones. "frequency"
    measures a word's mass by its count; "sqrt" by sqrt(count), which splits the rare words into
    more classes: smaller classes for the words that occur, so faster training, but on PTB a worse
    model (docs/benchmarks.md), so "frequency" is the default. `num_classes=1` is a plain full softmax.
    """
    if rule not in CLASS_RULES:
        raise ValueError(f"class rule must be one of {', '.join(CLASS_RULES)}, not {rule!r}")
    mass_of = np.asarray(counts, dtype=np.float64)
    if rule == "sqrt":
        mass_of = np.sqrt(mass_of)
    total = max(mass_of.sum(), 1e-300)
    classes = np.zeros(len(counts), dtype=np.int32)
    mass, current = 0.0, 0
    for i, m in enumerate(mass_of):
        classes[i] = current
        mass = min(mass + m / total, 1.0)
        if mass > (current + 1) / num_classes and current < num_classes - 1:
            current += 1
    return classes
