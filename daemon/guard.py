"""Keeping online adaptation honest: decay toward the base weights, a shadow of the base model,
and a guard that rolls a domain back when adapting has made it worse than the model it started as.

What protects every update, whatever is configured here:

* a word whose ln P is not finite is not learned from (the compiled step skips it and reports how
  many it applied; the daemon counts the rest as `rnnlm_updates_total{outcome="skipped"}`), and if
  a domain's weights ever hold NaN or infinity after such a skip, the domain is rolled back;
* each update is bounded: the output layers' error is p - 1[target] (|g| ≤ 1, times s ∈ (0, 1)),
  and the hidden-layer errors are clipped to ±15 before they reach W and U (`kernels.ERROR_CUTOFF`,
  the reference toolkit's gradient cut-off).

Optional (all off by default):

* **decay toward the base** (Krause et al., 2018, *Dynamic Evaluation of Neural Sequence Models*):
  after every message a domain learned from, `w ← w + λ (w_base − w)` for each weight matrix, so
  adapted weights are pulled back to the trained model at rate λ and cannot wander off for good;
* **the shadow**: a fraction of score messages (drawn at random) is also scored by the base model
  (learn: false, same text, a hidden state of its own per stream), so the adapted and the base
  model's loss can be compared on the same tokens, per domain;
* **the guard**: every `window` sampled tokens a domain's adapted perplexity on the sample is
  compared with the base model's; if it is more than `margin` higher (0.1 = 10 %), the domain is
  rolled back. The target is its last good state — the snapshot taken at the end of the good
  window before the last good one, so a state is trusted only after one more window passed — if
  that state, scored on the very window that failed, is within the margin of the base model;
  otherwise (or if the domain was rolled back in the window before too) the base weights. The
  check matters because traffic that poisons a domain also looks *good* while it lasts (after a
  thousand repeats of one token the adapted model predicts it far better than the base model), so
  the snapshots taken meanwhile are poisoned too; the failure shows when normal text returns, and
  the window of that text is what tells a usable snapshot from a poisoned one. A rolled-back
  domain keeps its streams and counters; the rollback is counted per domain.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

from rnnlm.model import FROZEN, RNNLM, Weights


@dataclass
class AdaptConfig:
    decay_to_base: float = 0.0  # λ per learning message; 0 = off
    shadow_sample: float = 0.0  # fraction of score messages also scored by the base model; 0 = off
    guard_margin: float | None = None  # roll back when adapted perplexity > (1 + margin) × base; None = off
    guard_window: int = 2000  # sampled tokens per comparison
    seed: int = 0  # the shadow's sampling

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay_to_base <= 1.0:
            raise ValueError(f"decay toward the base must be in [0, 1], got {self.decay_to_base}")
        if not 0.0 <= self.shadow_sample <= 1.0:
            raise ValueError(f"the shadow sample must be a fraction in [0, 1], got {self.shadow_sample}")
        if self.guard_margin is not None:
            if self.guard_margin < 0:
                raise ValueError(f"the guard margin must be ≥ 0, got {self.guard_margin}")
            if self.shadow_sample <= 0:
                raise ValueError("the guard compares against the base model's shadow: give a shadow sample > 0")
        if self.guard_window < 1:
            raise ValueError(f"the guard window must be at least one token, got {self.guard_window}")


@dataclass
class Sample:
    """One message scored by both models: -Σ ln P of the adapted and of the base model."""

    adapted_loss: float
    base_loss: float
    tokens: int


@dataclass
class GuardState:
    """Per domain: the current comparison window, snapshots, rollbacks."""

    adapted_loss: float = 0.0
    base_loss: float = 0.0
    tokens: int = 0
    window_words: list = field(default_factory=list)  # the sampled messages of the current window
    candidate: Weights | None = None  # the state at the end of the last good window
    last_good: Weights | None = None  # the candidate before it, confirmed by one more good window
    bad_in_row: int = 0
    rollbacks: int = 0
    sampled_tokens: int = 0  # totals over the domain's life (stats)
    sampled_loss: float = 0.0
    base_loss_total: float = 0.0

    def clear_window(self) -> None:
        self.adapted_loss = self.base_loss = 0.0
        self.tokens = 0
        self.window_words = []


class Adaptation:
    """Decay, shadow sampling and the guard, for a Learner (one thread, like the Learner)."""

    def __init__(self, config: AdaptConfig, model: RNNLM):
        self.config = config
        self.model = model
        self.base = base = model.weights
        self.rng = random.Random(config.seed)
        lam = config.decay_to_base
        # λ·w_base once, so a decay is two in-place passes and no temporary: w ← (1-λ) w + λ w_base
        self.scaled_base = {n: (a * np.float32(lam)).astype(np.float32) for n, a in base.arrays().items()} if lam else {}

    @property
    def guarding(self) -> bool:
        return self.config.guard_margin is not None

    def sample(self) -> bool:
        p = self.config.shadow_sample
        return p > 0 and (p >= 1 or self.rng.random() < p)

    def decay(self, weights: Weights) -> None:
        lam = self.config.decay_to_base
        if not lam:
            return
        keep = np.float32(1.0 - lam)
        for name, array in weights.arrays().items():
            if name in self.scaled_base:  # not a domain's block table and blocks of D: those decay below
                np.multiply(array, keep, out=array)
                array += self.scaled_base[name]
        if weights.D_own is not None:
            weights.D_own.decay(keep, self.scaled_base["D"])

    def observe(self, guard: GuardState, weights: Weights, sample: Sample, words: list[str]) -> str | None:
        """Add one sampled message to the domain's window; returns why it was rolled back, if it was."""
        guard.sampled_tokens += sample.tokens
        guard.sampled_loss += sample.adapted_loss
        guard.base_loss_total += sample.base_loss
        if not self.guarding:
            return None
        if not (math.isfinite(sample.adapted_loss) and math.isfinite(sample.base_loss)):
            if not math.isfinite(sample.adapted_loss) and math.isfinite(sample.base_loss):
                return self.roll_back(guard, weights, "the adapted loss is not finite")
            return None
        guard.adapted_loss += sample.adapted_loss
        guard.base_loss += sample.base_loss
        guard.tokens += sample.tokens
        guard.window_words.append(words)
        if guard.tokens < self.config.guard_window:
            return None
        ratio = _exp((guard.adapted_loss - guard.base_loss) / guard.tokens)  # adapted / base perplexity
        if ratio > 1.0 + self.config.guard_margin:
            return self.roll_back(guard, weights, f"perplexity {ratio:.3f}× the base model's")
        guard.clear_window()
        guard.bad_in_row = 0
        if guard.candidate is not None:
            guard.last_good = guard.candidate
        guard.candidate = weights.copy()
        return None

    def roll_back(self, guard: GuardState, weights: Weights, why: str) -> str:
        """Put the domain's weights back: its last good state if it passes on the failed window,
        else the base model."""
        target, to = guard.last_good, "its last good state"
        if (target is None or guard.bad_in_row > 0 or not target.all_finite()
                or not self.passes(target, guard.window_words)):
            target, to = self.base, "the base model"
            guard.last_good = None
        weights.assign(target)
        guard.candidate = None
        guard.bad_in_row += 1
        guard.rollbacks += 1
        guard.clear_window()
        return f"{why}; back to {to}"

    def passes(self, weights: Weights, messages: list[list[str]]) -> bool:
        """Whether `weights` score these messages within the margin of the base model (each
        message from a fresh state, the same for both; nothing learns)."""
        if not messages or self.config.guard_margin is None:
            return False
        loss = {"snapshot": 0.0, "base": 0.0}
        tokens = 0
        for words in messages:
            tokens += len(words)
            for key, w in (("snapshot", weights), ("base", self.base)):
                logp, _, _ = self.model.score_words(words, self.model.new_state(FROZEN), FROZEN, w)
                loss[key] -= float(logp.sum())
        ratio = _exp((loss["snapshot"] - loss["base"]) / tokens)
        return math.isfinite(ratio) and ratio <= 1.0 + self.config.guard_margin



def _exp(x: float) -> float:
    return math.exp(min(x, 700.0)) if math.isfinite(x) else math.inf
