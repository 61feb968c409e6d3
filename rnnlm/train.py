"""Training with the paper's recipe: SGD, truncated BPTT, and the halving learning-rate schedule.

After each epoch the model is tested on validation text. While the log-likelihood improves by at
least a factor (default 1.003) the rate stays; the first time it does not, the rate is halved every
epoch from then on; the next time, training stops. Weights that made validation worse are never
kept: the previous ones are restored.

Several threads may share an epoch (see EpochRun). An epoch can pause between rounds: a `Trainer`
subclass merges the weights of several processes there (rnnlm/distributed.py), and the state at a
pause is what a training checkpoint holds (rnnlm/resume.py).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .evaluate import CHUNK, Tally, evaluate
from .model import RNNLM, OnlineRule, StreamState, Weights

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


class EpochRun:
    """One pass of SGD over `ids` that may pause between rounds and go on (see train_epoch).

    `position` is how far each thread has got into its part of the text; with `states` and
    `tally` it is everything needed to continue the pass later, in this process or another.
    """

    def __init__(self, model: RNNLM, ids: np.ndarray, rule: OnlineRule, threads: int,
                 position: int = 0, states: list[StreamState] | None = None, tally: Tally | None = None):
        self.model, self.rule = model, rule
        self.shards = np.array_split(ids, threads)
        self.states = states or [model.new_state(rule) for _ in self.shards]
        own = model.weights
        self.replicas = [own] + [Weights(U=own.U, W=own.W.copy(), V=own.V, X=own.X.copy(), D=own.D) for _ in self.shards[1:]]
        self.words_per_round = SYNC_WORDS if threads > 1 else CHUNK
        self.length = max(len(s) for s in self.shards)
        self.position = position
        self.tally = tally or Tally()
        self._no_kinds = np.zeros(max(SYNC_WORDS, CHUNK), dtype=np.int8)

    @property
    def finished(self) -> bool:
        return self.position >= self.length

    def advance(self, stop: int, report: Callable[[int, Tally], None] | None = None) -> None:
        """Train until each thread's position reaches `stop` (or the end of its part)."""
        stop = min(stop, self.length)
        threads = len(self.shards)

        def work(shard, state, weights, lo, hi):
            return self.model.step(shard[lo:hi], state, self.rule, weights)[0]

        before = self.tally.seconds
        start = last_report = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            while self.position < stop:
                lo, hi = self.position, min(self.position + self.words_per_round, stop)
                for logp in pool.map(work, self.shards, self.states, self.replicas, [lo] * threads, [hi] * threads):
                    self.tally.add(logp, self._no_kinds[:len(logp)])
                if threads > 1:
                    merge_dense_updates(self.replicas)
                self.position = hi
                if report and time.perf_counter() - last_report > 0.2:
                    self.tally.seconds = before + time.perf_counter() - start  # so a report's words/s is the epoch's
                    report(self.tally.words, self.tally)
                    last_report = time.perf_counter()
        self.tally.seconds = before + time.perf_counter() - start

    def weights_changed(self) -> None:
        """The model's W and X were changed from outside (a merge with other processes): hand them
        to the other threads' copies."""
        own = self.replicas[0]
        for other in self.replicas[1:]:
            for name in DENSE:
                np.copyto(getattr(other, name), getattr(own, name))


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
    run = EpochRun(model, ids, rule, threads)
    run.advance(run.length, report)
    if report:
        report(run.tally.words, run.tally)
    return run.tally


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


@dataclass
class Schedule:
    """Where the paper's schedule stands: the epoch under way, its rate, and the best validation."""

    epoch: int
    lr: float
    halving: bool = False
    best: Tally | None = None  # validation tally of the weights we keep
    finished: bool = False  # stopped by the schedule (--max-epochs is the Trainer's to check)

    def after_validation(self, valid: Tally, kept: bool, min_improvement: float) -> None:
        # Log-likelihood must improve by the factor min_improvement, else halve (or, once halving, stop).
        if self.best is not None and valid.loss_nats * min_improvement > self.best.loss_nats:
            if self.halving:
                self.finished = True
            self.halving = True
        if kept:
            self.best = valid
        if self.halving:
            self.lr /= 2
        self.epoch += 1


class Trainer:
    """The epoch loop of one process. Subclasses change what happens between rounds of an epoch
    (`pause_every`, `between_rounds`), which part of the text this process learns from
    (`own_part`) and how validation is counted (`validate`); the schedule stays here, once.

    `checkpoint(trainer)`, when given, is called at every pause that is `checkpoint_words` (per
    process) after the last one, and after every epoch.
    """

    def __init__(self, model: RNNLM, train_words: list[str], valid_words: list[str], threads: int = 1,
                 progress: Callable[[int, int, int, Tally], None] | None = None,
                 on_epoch: Callable[[EpochReport], None] | None = None,
                 checkpoint: Callable[["Trainer"], None] | None = None, checkpoint_words: int | None = None):
        self.model, self.threads = model, threads
        self.valid_words = valid_words
        self.ids = self.own_part(model.vocab.encode(train_words)[0])
        self.progress, self.on_epoch = progress, on_epoch
        self.checkpoint, self.checkpoint_words = checkpoint, checkpoint_words
        self.schedule = Schedule(epoch=1, lr=model.config.lr)
        self.report = TrainReport()
        self.epoch_start: Weights | None = None  # the weights to restore if this epoch makes validation worse
        self.run: EpochRun | None = None

    # --- what subclasses change -------------------------------------------------------------------

    def own_part(self, ids: np.ndarray) -> np.ndarray:
        return ids

    def pause_every(self) -> int | None:
        """Words per thread between pauses, or None for none but those checkpoints ask for."""
        return None

    def between_rounds(self, run: EpochRun) -> None:
        pass

    def validate(self) -> Tally:
        return evaluate(self.model, self.valid_words)

    def epoch_tally(self, tally: Tally) -> Tally:
        return tally

    def rounds_needed(self, run: EpochRun, step: int) -> int:
        return -(-(run.length - run.position) // step)

    # --- the loop ---------------------------------------------------------------------------------

    def start_epoch(self) -> None:
        cfg = self.model.config
        rule = OnlineRule(lr=self.schedule.lr, l2=cfg.l2, direct_l2=cfg.direct_l2, dense_rate=cfg.dense_rate,
                          bptt=cfg.bptt, block=cfg.bptt_block)
        self.epoch_start = self.model.weights.copy()
        self.run = EpochRun(self.model, self.ids, rule, self.threads)

    def checkpoint_step(self) -> int | None:
        """Words per thread between checkpoints inside an epoch, a whole number of rounds."""
        if self.checkpoint is None or not self.checkpoint_words:
            return None
        per_thread = -(-self.checkpoint_words // self.threads)
        if self.threads == 1:
            return per_thread
        return -(-per_thread // SYNC_WORDS) * SYNC_WORDS  # pausing mid-round would move the threads' merges

    def run_epoch(self) -> Tally:
        run, epoch = self.run, self.schedule.epoch

        def report(done: int, tally: Tally) -> None:
            if self.progress:
                self.progress(epoch, done, len(self.ids), tally)

        step = self.pause_every() or self.checkpoint_step()
        if step is None:
            run.advance(run.length, report)
        else:
            # Checkpoints come at pauses, so taking them changes nothing in what is learned.
            every = -(-self.checkpoint_step() // step) if self.checkpoint_step() else 0
            rounds = self.rounds_needed(run, step)
            for done in range(1, rounds + 1):
                run.advance(run.position + step, report)
                self.between_rounds(run)
                if every and done % every == 0 and done < rounds:
                    self.checkpoint(self)
        report(run.tally.words, run.tally)
        return self.epoch_tally(run.tally)

    def finish_epoch(self, train_tally: Tally) -> None:
        valid = self.validate()
        best = self.schedule.best
        kept = self.model.weights.all_finite() and (best is None or valid.loss_nats < best.loss_nats)
        if not kept:
            self.model.weights.assign(self.epoch_start)
        entry = EpochReport(self.schedule.epoch, self.schedule.lr, train_tally, valid, kept)
        self.report.epochs.append(entry)
        if self.on_epoch:
            self.on_epoch(entry)
        self.schedule.after_validation(valid, kept, self.model.config.min_improvement)
        self.run = None

    def train(self) -> TrainReport:
        start = time.perf_counter() - self.report.seconds
        while not self.schedule.finished and self.schedule.epoch <= self.model.config.max_epochs:
            if self.run is None:
                self.start_epoch()
            tally = self.run_epoch()
            self.finish_epoch(tally)
            self.report.seconds = time.perf_counter() - start
            if self.checkpoint:
                self.checkpoint(self)
        self.report.seconds = time.perf_counter() - start
        return self.report


def train(model: RNNLM, train_words: list[str], valid_words: list[str], threads: int = 1,
          progress: Callable[[int, int, int, Tally], None] | None = None,
          on_epoch: Callable[[EpochReport], None] | None = None) -> TrainReport:
    return Trainer(model, train_words, valid_words, threads, progress, on_epoch).train()
