"""The Elman network of Mikolov et al. (2010): weights, per-stream state, and the online step.

Everything that learns goes through `RNNLM.step`, which calls the compiled `kernels.sgd_pass`:
training epochs (α=0.1, truncated BPTT), offline dynamic evaluation and the daemon (α=0.01, τ=1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from . import direct, kernels
from .direct import DirectBlocks
from .vocab import Vocabulary

INITIAL_ACTIVATION = 0.1  # s(0), as in the paper


@dataclass
class Config:
    hidden: int = 200
    classes: int = 100
    bptt: int = 4  # extra steps back in time beyond the block (toolkit's -bptt)
    bptt_block: int = 10  # back-propagate through time every this many words
    min_count: int = 1  # words seen fewer times merge into <rare>
    lr: float = 0.1
    l2: float = 1e-7
    min_improvement: float = 1.003
    max_epochs: int = 20
    seed: int = 1
    init_std: float = 0.1  # Gaussian init; the toolkit's sum of three U(-0.1, 0.1) has std 0.1
    dense_rate: float = 1.0  # in training, W and X learn at this multiple of the rate (the dynamic model: always 1)
    # Direct connections (RNNME): hashed n-gram features straight to the outputs; 0 = off.
    direct: float = 0.0  # millions of weights in the hash array (the toolkit's -direct)
    direct_order: int = 3  # features of the last 0..order-1 words (the toolkit's -direct-order)
    direct_l2: float = 0.0  # L2 of the direct weights in training, apart from the network's
    direct_rate: float = 1.0  # the direct weights learn at this multiple of the rate, in training and online

    DIRECT_FIELDS = ("direct", "direct_order", "direct_l2", "direct_rate")

    @property
    def direct_size(self) -> int:
        """Weights in the hash array: two equal halves (class features, word features)."""
        return 2 * int(round(self.direct * 1e6 / 2))

    @property
    def direct_features(self) -> int:
        return self.direct_order if self.direct_size else 0

    def to_state(self) -> dict:
        state = asdict(self)
        if not self.direct_size:  # a model without direct connections is written as before they existed
            for name in self.DIRECT_FIELDS:
                del state[name]
        if self.dense_rate == 1.0:  # likewise a model trained at the paper's one rate
            del state["dense_rate"]
        return state

    @classmethod
    def from_state(cls, state: dict) -> "Config":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in state.items() if k in known})


def no_direct() -> np.ndarray:
    return np.zeros(0, dtype=np.float32)


@dataclass
class Weights:
    U: np.ndarray  # (vocab, hidden) input word -> hidden
    W: np.ndarray  # (hidden, hidden) recurrent
    V: np.ndarray  # (vocab, hidden) hidden -> word, rows grouped by class
    X: np.ndarray  # (classes, hidden) hidden -> class
    D: np.ndarray = field(default_factory=no_direct)  # (direct_size,) hashed n-gram weights; empty = none
    # A daemon domain's copy (`adapted_copy`): D is then the base model's, which it only reads, and
    # the blocks of D it has changed are its own here (rnnlm/direct.py).
    D_own: DirectBlocks | None = None

    NAMES = ("U", "W", "V", "X")

    @classmethod
    def random(cls, vocab_size: int, hidden: int, classes: int, std: float, seed: int,
               direct_size: int = 0) -> "Weights":
        rng = np.random.default_rng(seed)
        def gaussian(*shape):
            return (rng.standard_normal(shape) * std).astype(np.float32)
        # Direct weights start at zero, as in the toolkit: the n-gram features begin silent.
        return cls(gaussian(vocab_size, hidden), gaussian(hidden, hidden), gaussian(vocab_size, hidden),
                   gaussian(classes, hidden), np.zeros(direct_size, dtype=np.float32))

    @property
    def names(self) -> tuple[str, ...]:
        """The arrays this model has: D only with direct connections; a domain's copy has its own blocks of D instead."""
        if self.D_own is not None:
            return self.NAMES + ("D_table", "D_blocks")
        return self.NAMES + ("D",) if self.D.size else self.NAMES

    def network_copy(self) -> dict[str, np.ndarray]:
        return {n: np.array(getattr(self, n), copy=True) for n in self.NAMES}

    def copy(self) -> "Weights":
        if self.D_own is not None:  # the base's D stays shared
            return Weights(**self.network_copy(), D=self.D, D_own=self.D_own.copy())
        return Weights(**self.network_copy(), D=self.D.copy())

    def adapted_copy(self) -> "Weights":
        """A copy to adapt (a daemon domain): the network copied, D shared and copied block by block as it changes."""
        if not self.D.size:
            return self.copy()
        if self.D_own is not None:
            return self.copy()
        return Weights(**self.network_copy(), D=self.D, D_own=DirectBlocks.empty(self.D.size))

    def assign(self, other: "Weights") -> None:
        """Overwrite in place (arrays shared with running code stay valid)."""
        for n in self.NAMES:
            np.copyto(getattr(self, n), getattr(other, n))
        if self.D_own is not None:  # `other` is another copy of the same base, or the base itself
            self.D_own.assign(other.D_own)
        elif self.D.size:
            np.copyto(self.D, other.D)

    def arrays(self) -> dict[str, np.ndarray]:
        own = {"D_table": self.D_own.table, "D_blocks": self.D_own.blocks} if self.D_own is not None else {}
        return {n: own[n] if n in own else getattr(self, n) for n in self.names}

    def all_finite(self) -> bool:
        return all(np.isfinite(a).all() for a in self.arrays().values())


class StreamState:
    """One text stream's context: a window of recent hidden states for back-propagation in time.

    The window holds `bptt + block` steps (two for plain τ=1 updates). A fresh stream starts after
    an implicit sentence end with s(0) = 0.1, as the toolkit does.
    """

    def __init__(self, hidden: int, eos_id: int, window: int = 1):
        self.hidden = np.full((window + 1, hidden), INITIAL_ACTIVATION, dtype=np.float32)
        self.inputs = np.full(window + 1, eos_id, dtype=np.int32)
        self.errors = np.zeros((window + 1, hidden), dtype=np.float32)
        self.meta = np.zeros(3, dtype=np.int64)
        self.meta[kernels.LAST_WORD] = eos_id

    @property
    def window(self) -> int:
        return self.hidden.shape[0] - 1

    def copy(self) -> "StreamState":
        other = StreamState.__new__(StreamState)
        for name in ("hidden", "inputs", "errors", "meta"):
            setattr(other, name, getattr(self, name).copy())
        return other


@dataclass
class OnlineRule:
    """How the network learns from what it scores: rate, L2, and how far errors go back in time.

    The defaults are the dynamic model (the daemon and `rnnlm eval --dynamic`): rate 0.01 and an
    update after every word that reaches one step back in time: τ=2 buys most of what longer BPTT
    gives, at a small cost in speed (the τ sweep is in docs/benchmarks.md).
    """

    lr: float = 0.01
    l2: float = 0.0
    direct_l2: float = 0.0  # L2 of the direct weights (Config.direct_l2 in training)
    direct_rate: float | None = None  # the direct weights' rate as a multiple of lr; None: the model's (Config.direct_rate)
    dense_rate: float = 1.0  # W and X learn at this multiple of lr (training's Config.dense_rate)
    bptt: int = 1
    block: int = 1
    learn: bool = True

    @property
    def window(self) -> int:
        return self.bptt + self.block


FROZEN = OnlineRule(learn=False)  # scores without learning: static evaluation, the base model's shadow


class RNNLM:
    def __init__(self, config: Config, vocab: Vocabulary, weights: Weights):
        self.config = config
        self.vocab = vocab
        self.weights = weights

    @classmethod
    def create(cls, config: Config, vocab: Vocabulary) -> "RNNLM":
        check_direct_size(config, vocab)
        weights = Weights.random(len(vocab), config.hidden, vocab.num_classes, config.init_std, config.seed,
                                 config.direct_size)
        return cls(config, vocab, weights)

    def state_window(self, rule: OnlineRule | None = None) -> int:
        """Steps a stream's window holds: what the rule back-propagates through, and at least the
        order-1 words of history the direct features hash (they are read from the window's inputs)."""
        return max((rule or OnlineRule()).window, self.config.direct_features - 1)

    def new_state(self, rule: OnlineRule | None = None) -> StreamState:
        return StreamState(self.config.hidden, self.vocab.eos_id, self.state_window(rule))

    def step(self, ids: np.ndarray, state: StreamState, rule: OnlineRule,
             weights: Weights | None = None) -> tuple[np.ndarray, int]:
        """Score each id with the current weights, then (if rule.learn) update on it.

        Returns ln P(id) per id and the number of updates applied (a non-finite loss is skipped).

        This is the online step: training, dynamic evaluation and the daemon all come here.
        `weights` defaults to the model's own; the daemon passes a domain's adapted copy, whose
        direct weights are copied block by block as the step first writes them (rnnlm/direct.py).
        """
        if state.window < self.state_window(rule):
            raise ValueError(f"stream state holds {state.window} steps, the rule needs {self.state_window(rule)}")
        w = self.weights if weights is None else weights
        v = self.vocab
        cfg = self.config
        if w.D.size != cfg.direct_size:  # the step indexes D by hash, unchecked: it must be the size checked at load
            raise ValueError(f"direct weights hold {w.D.size} values, the model has {cfg.direct_size}")
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        out = np.empty(ids.shape[0], dtype=np.float64)
        own = w.D_own
        if own is None or not rule.learn:
            return out, self._pass(w, own, ids, state, rule, out)
        learned = 0
        per_word = direct.blocks_per_word(cfg.direct_features, v.num_classes, int(np.max(v.class_end - v.class_start)))
        for lo in range(0, ids.shape[0], direct.MAX_WORDS_PER_CALL):
            piece = ids[lo: lo + direct.MAX_WORDS_PER_CALL]
            own.reserve(per_word * piece.shape[0])  # the step copies blocks into the pool unchecked
            learned += self._pass(w, own, piece, state, rule, out[lo: lo + piece.shape[0]])
        return out, learned

    def _pass(self, w: Weights, own: DirectBlocks | None, ids: np.ndarray, state: StreamState, rule: OnlineRule,
              out: np.ndarray) -> int:
        v, cfg = self.vocab, self.config
        table, pool, used = (own.table, own.pool, own.used) if own is not None else (direct.NO_TABLE, direct.NO_POOL, direct.NO_USED)
        return kernels.sgd_pass(w.U, w.W, w.V, w.X, w.D, table, pool, used, v.class_of, v.class_start, v.class_end,
                                state.hidden, state.inputs, state.errors, state.meta,
                                ids, np.float32(rule.lr), np.float32(rule.lr * rule.dense_rate), np.float32(rule.l2),
                                np.float32(rule.lr * (cfg.direct_rate if rule.direct_rate is None else rule.direct_rate)),
                                np.float32(rule.direct_l2), cfg.direct_features,
                                rule.bptt, rule.block, rule.learn, out)

    def score_words(self, words: list[str], state: StreamState, rule: OnlineRule,
                    weights: Weights | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """ln P(word) for each word (eq. 7 applied to rare words), each word's kind, updates applied."""
        ids, kinds = self.vocab.encode(words)
        logp, learned = self.step(ids, state, rule, weights)
        if kinds.any():  # some rare or OOV word
            logp += self.vocab.word_logprob_offset(kinds)
        return logp, kinds, learned

    def describe(self) -> dict:
        described = {
            "vocab_size": len(self.vocab),
            "classes": self.vocab.num_classes,
            "hidden": self.config.hidden,
            "rare_words": len(self.vocab.rare_words),
            "min_count": self.config.min_count,
        }
        if self.config.direct_size:
            described.update(direct_weights=self.config.direct_size, direct_order=self.config.direct_order)
        return described


def check_direct_size(config: Config, vocab: Vocabulary) -> None:
    """Each half of the hash array must hold a block of all classes, and one of the largest class's words."""
    if not config.direct_size:
        return
    if config.direct_order < 1:
        raise ValueError(f"direct order must be at least 1, not {config.direct_order}")
    need = max(vocab.num_classes, int(np.max(vocab.class_end - vocab.class_start)))
    if config.direct_size // 2 < 2 * need:
        raise ValueError(f"direct size {config.direct_size} is too small for this vocabulary: "
                         f"each half must hold at least {2 * need} weights")
