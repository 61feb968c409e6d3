"""Perplexity, static or dynamic: the text is scored word by word through the online step.

Static evaluation scores with fixed weights; dynamic evaluation (the paper's dynamic model) lets
the network take one SGD step after each word it has scored, at a fixed rate, in one pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .model import FROZEN, RNNLM, OnlineRule, StreamState, Weights
from .vocab import OOV, RARE_WORD

CHUNK = 8192  # words per call into the compiled loop; small enough for a lively progress bar


@dataclass
class Tally:
    """Running totals from which perplexity over any span follows: exp(loss / words)."""

    words: int = 0
    oov: int = 0
    rare: int = 0
    loss_nats: float = 0.0  # -Σ ln P(w)
    seconds: float = 0.0

    def add(self, logp: np.ndarray, kinds: np.ndarray) -> None:
        counts = np.bincount(kinds, minlength=3)
        self.add_counts(int(logp.shape[0]), int(counts[OOV]), int(counts[RARE_WORD]), -float(logp.sum()))

    def add_counts(self, words: int, oov: int, rare: int, loss_nats: float) -> None:
        """Add totals counted elsewhere (another tally, a daemon's reply)."""
        self.words += words
        self.oov += oov
        self.rare += rare
        self.loss_nats += loss_nats

    @property
    def perplexity(self) -> float:
        if not self.words:
            return float("nan")
        mean = self.loss_nats / self.words
        return math.exp(mean) if mean < 700 else math.inf  # exp overflows a float past ~709

    @property
    def entropy_bits(self) -> float:
        return self.loss_nats / self.words / math.log(2) if self.words else float("nan")

    @property
    def words_per_sec(self) -> float:
        return self.words / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "entropy_bits": self.entropy_bits,
            "words": self.words,
            "oov": self.oov,
            "rare": self.rare,
            "loss_nats": self.loss_nats,
            "seconds": self.seconds,
            "words_per_sec": self.words_per_sec,
        }


def evaluate(model: RNNLM, words: list[str], rule: OnlineRule | None = None, weights: Weights | None = None,
             state: StreamState | None = None, progress: Callable[[int], None] | None = None,
             per_word: list[float] | None = None) -> Tally:
    """Score `words` as one stream. With a learning rule, the weights adapt as they go (dynamic).

    Dynamic evaluation changes the weights it is given; pass a copy to keep the model as it was.
    """
    rule = rule or FROZEN
    state = state or model.new_state(rule)
    ids, kinds = model.vocab.encode(words)
    offsets = model.vocab.word_logprob_offset(kinds)
    tally = Tally()
    start = time.perf_counter()
    for lo in range(0, len(ids), CHUNK):
        hi = min(lo + CHUNK, len(ids))
        logp = model.step(ids[lo:hi], state, rule, weights)[0] + offsets[lo:hi]
        tally.add(logp, kinds[lo:hi])
        if per_word is not None:
            per_word.extend(logp.tolist())
        if progress:
            progress(hi - lo)
    tally.seconds = time.perf_counter() - start
    return tally
