"""Training with the paper's recipe: SGD, truncated BPTT, and the halving learning-rate schedule.

After each epoch the model is tested on validation text. While the log-likelihood improves by at
least a factor (default 1.003) the rate stays; the first time it does not, the rate is halved every
epoch from then on; the next time, training stops. Weights that made validation worse are never
kept: the previous ones are restored.

Several threads may share an epoch (see train_epoch).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .evaluate import CHUNK, Tally, evaluate
from .model import RNNLM, OnlineRule, Weights

SYNC_WORDS = 64  # words per thread between merges of the threads' copies of W and X (every 32 ran 15 % slower)
DENSE = ("W", "X")


@dataclass
class EpochReport:
    epoch: int
    lr: float
    train: Tally
    valid: Tally
    kept: bool  # False when validation got worse and the previous weights were restored


@dataclass
class TrainReport:
    epochs: list[EpochReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def best_valid(self) -> Tally:
        return min((e.valid for e in self.epochs if e.kept), key=lambda t: t.loss_nats)

    @property
    def words_per_sec(self) -> float:
        words = sum(e.train.words for e in self.epochs)
        return words / self.seconds if self.seconds else float("nan")


def train_epoch(model: RNNLM, ids: np.ndarray, rule: OnlineRule, threads: int,
                report: Callable[[int, Tally], None] | None = None) -> Tally:
    """One pass of SGD over `ids`; `report(words done, tally)` now and then.

    With several threads, each takes a contiguous part of the text with its own hidden state.
    The big, sparsely updated matrices (U, V: one row per input word, the rows of one class per
    target) are shared and updated without locks (Hogwild). The small dense ones (W, and the class
    layer X, rewritten after every word) are private to each thread, and every SYNC_WORDS words
    the threads' copies are averaged into one (see merge_dense_updates): two threads writing the
    same cache lines word after word barely run faster than one (docs/benchmarks.md).
    """
    shards = np.array_split(ids, threads)
    states = [model.new_state(rule) for _ in shards]
    own = model.weights
    replicas = [own] + [Weights(U=own.U, W=own.W.copy(), V=own.V, X=own.X.copy()) for _ in shards[1:]]
    tally = Tally()
    no_kinds = np.zeros(max(SYNC_WORDS, CHUNK), dtype=np.int8)

    words_per_round = SYNC_WORDS if threads > 1 else CHUNK

    def work(shard, state, weights, lo):
        return model.step(shard[lo:lo + words_per_round], state, rule, weights)[0]

    start = time.perf_counter()
    last_report = start
    with ThreadPoolExecutor(threads) as pool:
        for lo in range(0, max(len(s) for s in shards), words_per_round):
            for logp in pool.map(work, shards, states, replicas, [lo] * threads):
                tally.add(logp, no_kinds[:len(logp)])
            if threads > 1:
                merge_dense_updates(replicas)
            if report and time.perf_counter() - last_report > 0.2:
                tally.seconds = time.perf_counter() - start  # so the report's words/s is the epoch's
                report(tally.words, tally)
                last_report = time.perf_counter()
    tally.seconds = time.perf_counter() - start
    if report:
        report(tally.words, tally)
    return tally


def merge_dense_updates(replicas: list[Weights]) -> None:
    """Average the threads' copies of W and X into one, shared by all.

    W and X take a step at every word of every thread, so over a round the threads' updates are
    estimates of the same step, and their mean is the step taken: synchronous data-parallel SGD, as
    Kaldi averages the models of its parallel jobs. Summing them instead moves the dense layers at
    twice the rate, and validation levels off far higher (docs/benchmarks.md). U and V rows, each touched by few words in a round, keep every update.
    """
    for name in DENSE:
        total = getattr(replicas[0], name)
        for other in replicas[1:]:
            total += getattr(other, name)
        total /= len(replicas)
        for other in replicas[1:]:
            np.copyto(getattr(other, name), total)


def train(model: RNNLM, train_words: list[str], valid_words: list[str], threads: int = 1,
          progress: Callable[[int, int, int, Tally], None] | None = None,
          on_epoch: Callable[[EpochReport], None] | None = None) -> TrainReport:
    cfg = model.config
    ids, _ = model.vocab.encode(train_words)
    lr = cfg.lr
    halving = False
    best = None  # validation tally of the weights we keep
    result = TrainReport()
    start = time.perf_counter()
    for epoch in range(1, cfg.max_epochs + 1):
        saved = model.weights.copy()
        rule = OnlineRule(lr=lr, l2=cfg.l2, bptt=cfg.bptt, block=cfg.bptt_block)
        def report(done: int, tally: Tally) -> None:
            if progress:
                progress(epoch, done, len(ids), tally)

        train_tally = train_epoch(model, ids, rule, threads, report)
        valid = evaluate(model, valid_words)
        kept = model.weights.all_finite() and (best is None or valid.loss_nats < best.loss_nats)
        if not kept:
            model.weights.assign(saved)
        entry = EpochReport(epoch, lr, train_tally, valid, kept)
        result.epochs.append(entry)
        if on_epoch:
            on_epoch(entry)
        # Log-likelihood must improve by the factor min_improvement, else halve (or, once halving, stop).
        if best is not None and valid.loss_nats * cfg.min_improvement > best.loss_nats:
            if halving:
                break
            halving = True
        if kept:
            best = valid
        if halving:
            lr /= 2
    result.seconds = time.perf_counter() - start
    return result
