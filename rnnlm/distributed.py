"""`rnnlm train` on several processes and machines: torch.distributed (gloo) moves the bytes, the
compiled step (rnnlm/kernels.py) still does all the learning.

Under torchrun (RANK and WORLD_SIZE in the environment) each process, a *rank*, learns from its own
part of the training text, cut at sentence ends, with its own threads, exactly as one process does
(rnnlm/train.py). As they go the ranks merge their weights with `all_reduce` (WeightMerger):
the dense layers and the frequent words' rows every `sync_words` words per rank, all rows every
`sync_all_words`, each merge overlapped with the next round of training. At the end of every
epoch and at every checkpoint they settle, and all ranks hold the same weights, bit for bit.
Validation is counted by all ranks on their parts of the validation text and summed, so
every rank takes the same halve/stop/restore decision. Rank 0 writes the model and the training
checkpoints; on resume it reads the checkpoint and hands it to the others, so only rank 0 needs
the file.

Without torchrun's environment, `Launch.from_environment()` is one process and nothing changes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .cli_errors import say
from .corpus import EOS
from .evaluate import Tally, evaluate
from .model import RNNLM, Weights
from .resume import load_training, restore, run_to_state, save_training, text_digest, training_payload
from .train import EpochReport, EpochRun, TrainReport, Trainer

SPARSE = ("U", "V", "D")  # a row per word, or hash blocks: each rank touches few of them between merges
MERGE_RULES = ("sparse-sum", "mean")
SYNC_WORDS = 1024  # words per rank between merges of W, X and the frequent words' rows: chosen by measurement
SYNC_ALL_WORDS = 32768  # words of all ranks together between merges of all rows (per rank: this / ranks)
FREQUENT_SHARE = 0.8  # the most frequent words making this share of the text are merged every SYNC_WORDS
TIMEOUT = timedelta(minutes=10)  # a rank that waits this long for the others gives up


def default_sync_all_words(world_size: int, sync_words: int) -> int:
    """Words per rank between merges of all rows unless --sync-all-words says otherwise: the rare
    words' rows move at every rank, so the words read between their merges are kept constant in
    total (8 ranks at 16,384 each ended at 142.5 / 137.3 on PTB, at 4,096 each 140.6 / 135.1)."""
    return max(sync_words, SYNC_ALL_WORDS // world_size)


def default_dense_rate(world_size: int) -> float:
    """The multiple of α at which W and X learn unless --dense-rate says otherwise.

    One process: 1, the paper's recipe. N ranks average W and X at every merge, so per word read
    those move at dense_rate/N of α; N/8 keeps that at α/8, which measured best (2 ranks: 0.25
    against 0.5 and 1; 8 ranks: 1 against 0.25): Kaldi's rate × jobs, on the dense layers only.
    """
    return 1.0 if world_size == 1 else min(1.0, world_size / 8)


def sentence_bounds(is_end: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Cut a text whose sentence ends are marked in `is_end` into `parts` spans of nearly equal
    length, each cut at the sentence end nearest to the even cut (whole sentences only)."""
    ends = np.flatnonzero(is_end) + 1
    cuts = [0]
    for k in range(1, parts):
        target = k * len(is_end) / parts
        nearest = int(ends[np.argmin(np.abs(ends - target))]) if len(ends) else len(is_end)
        cuts.append(max(nearest, cuts[-1]))
    cuts.append(len(is_end))
    return list(zip(cuts, cuts[1:]))


def sentence_parts(ids: np.ndarray, eos_id: int, parts: int) -> list[np.ndarray]:
    return [ids[a:b] for a, b in sentence_bounds(ids == eos_id, parts)]


class WeightMerger:
    """Brings some rows of the ranks' weights together by all_reduce, overlapped with training.

    Each rank sends its deltas since the last merge; every rank adds the same sum, scaled, to a
    common base. "sparse-sum" (the default) is the two-thread recipe one level up: W and X,
    updated at every word by every rank, get the mean of the deltas; U, V and D keep every rank's
    update, base + Σ (rank's weights - base). "mean" averages all of them (Kaldi's model
    averaging), which on PTB learns too slowly at the same rate (docs/distributed-training.md).

    `merge` does not wait for its all_reduce: the sum arrives while the rank trains its next
    round, and is added at the next `merge`, so a rank sees the others' updates one round late
    and its own at once. `settle` waits for everything and merges what is left: afterwards every
    rank holds the same weights, bit for bit.

    `rows` names the arrays this merger covers and which of their rows (all, if not named).
    """

    def __init__(self, weights: Weights, world_size: int, rule: str = "sparse-sum",
                 rows: dict[str, slice] | None = None):
        if rule not in MERGE_RULES:
            raise ValueError(f"merge rule must be one of {', '.join(MERGE_RULES)}, not {rule!r}")
        self.world_size, self.rule = world_size, rule
        self.rows = rows if rows is not None else {name: slice(None) for name in weights.arrays()}
        parts = self.parts(weights)
        self.base = {name: part.copy() for name, part in parts.items()}  # the same, bit for bit, on every rank
        self.flat = torch.empty(sum(part.size for part in parts.values()), dtype=torch.float32)
        self.sent_flat = np.empty(self.flat.numel(), dtype=np.float32)
        self.summed, self.sent, offset = {}, {}, 0
        for name, part in parts.items():
            self.summed[name] = self.flat.numpy()[offset:offset + part.size].reshape(part.shape)
            self.sent[name] = self.sent_flat[offset:offset + part.size].reshape(part.shape)
            offset += part.size
        self.pending = None  # the all_reduce of the deltas last sent, while it runs

    def parts(self, weights: Weights) -> dict[str, np.ndarray]:
        arrays = weights.arrays()
        return {name: arrays[name][rows] for name, rows in self.rows.items()}

    def scale(self, name: str) -> np.float32:
        """What a merged array gets of the summed deltas: all (summed) or 1/N (averaged)."""
        summed = self.rule == "sparse-sum" and name in SPARSE
        return np.float32(1 if summed else 1 / self.world_size)

    def merge(self, weights: Weights, start_reduce: Callable[[torch.Tensor], "dist.Work"]) -> None:
        """At a pause: add the last merge's sum, and send this round's deltas. `start_reduce` starts
        summing a buffer over all ranks in place and returns something to `wait()` on."""
        self.take_sum(weights)
        self.pending = start_reduce(self.flat)

    def settle(self, weights: Weights, reduce: Callable[[torch.Tensor], None]) -> None:
        """Merge everything, waiting for it: every rank ends with the same weights."""
        self.take_sum(weights)
        reduce(self.flat)
        for name, own in self.parts(weights).items():
            self.base[name] += self.summed[name] * self.scale(name)
            np.copyto(own, self.base[name])
        self.pending = None

    def take_sum(self, weights: Weights) -> None:
        """own = base + Σ scaled sum + this rank's deltas not yet sent; those deltas go into the buffer."""
        for name, own in self.parts(weights).items():
            own -= self.base[name]
            if self.pending is not None:
                own -= self.sent[name]  # now only what this rank learned since its last merge
        if self.pending is not None:
            self.pending.wait()
            for name, base in self.base.items():
                base += self.summed[name] * self.scale(name)
        for name, own in self.parts(weights).items():
            np.copyto(self.summed[name], own)
            np.copyto(self.sent[name], own)
            own += self.base[name]

    def reset(self, weights: Weights) -> None:
        """The weights were set from outside (restored, resumed), the same on every rank: they are the new base."""
        for name, part in self.parts(weights).items():
            np.copyto(self.base[name], part)
        self.pending = None


def frequent_rows(vocab, share: float) -> int:
    """Rows of U and V (ids by descending count) of the most frequent words that together make
    `share` of the training text, rounded up to a whole class so a class's softmax rows merge together."""
    counts = np.asarray(vocab.counts, dtype=np.float64)
    covered = np.cumsum(counts) / counts.sum()
    last = min(int(np.searchsorted(covered, share)), len(counts) - 1)
    return int(vocab.class_end[vocab.class_of[last]])


def all_reduce_sum(tensor: torch.Tensor) -> None:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def start_all_reduce(tensor: torch.Tensor) -> dist.Work:
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)


def tally_sum(tally: Tally) -> Tally:
    """The tallies of all ranks added up (seconds: the slowest rank's)."""
    totals = torch.tensor([tally.words, tally.oov, tally.rare, tally.loss_nats], dtype=torch.float64)
    all_reduce_sum(totals)
    seconds = torch.tensor([tally.seconds], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    words, oov, rare, loss = totals.tolist()
    return Tally(int(words), int(oov), int(rare), loss, float(seconds.item()))


class DistributedTrainer(Trainer):
    """A rank's Trainer: its part of the text, merges at every pause, validation summed over ranks.

    Two mergers: every `sync_words` words the dense layers (W, X) and the rows of the frequent
    words (FREQUENT_SHARE of the text), which nearly every round moves; every `sync_all_words`
    the other rows, which few words move. Both overlap their all_reduce with the next round. At
    the end of an epoch and at a checkpoint, both settle.
    """

    def __init__(self, rank: int, world_size: int, sync_words: int, sync_all_words: int, merge_rule: str,
                 model: RNNLM, train_words: list[str], valid_words: list[str], threads: int, **kwargs):
        if sync_all_words < sync_words:
            raise ValueError(f"--sync-all-words ({sync_all_words}) must be at least --sync-words ({sync_words})")
        self.rank, self.world_size, self.sync_words = rank, world_size, sync_words
        self.rounds_per_full_merge = max(1, round(sync_all_words / sync_words))
        super().__init__(model, train_words, valid_words, threads, **kwargs)
        frequent = frequent_rows(model.vocab, FREQUENT_SHARE)
        names = model.weights.arrays()
        self.mergers = [WeightMerger(model.weights, world_size, merge_rule,
                                     {"U": slice(0, frequent), "W": slice(None), "V": slice(0, frequent), "X": slice(None)})]
        rest = {"U": slice(frequent, None), "V": slice(frequent, None), **{n: slice(None) for n in names if n not in Weights.NAMES}}
        if frequent < len(model.vocab) or len(rest) > 2:
            self.mergers.append(WeightMerger(model.weights, world_size, merge_rule, rest))
        self.round = 0
        lo, hi = sentence_bounds(np.array([w == EOS for w in valid_words]), world_size)[rank]
        self.valid_words = valid_words[lo:hi]

    def own_part(self, ids: np.ndarray) -> np.ndarray:
        return sentence_parts(ids, self.model.vocab.eos_id, self.world_size)[self.rank]

    def pause_every(self) -> int:
        return -(-self.sync_words // self.threads)

    def checkpoint_step(self) -> int | None:
        """Checkpoints come at a merge of all rows (rounds are counted from the last one)."""
        step = super().checkpoint_step()
        full = self.pause_every() * self.rounds_per_full_merge
        return None if step is None else -(-step // full) * full

    def rounds_needed(self, run: EpochRun, step: int) -> int:
        rounds = torch.tensor([super().rounds_needed(run, step)], dtype=torch.int64)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        return int(rounds.item())

    def run_epoch(self) -> Tally:
        self.round = 0
        return super().run_epoch()

    def between_rounds(self, run: EpochRun) -> None:
        start = time.perf_counter()
        self.round += 1
        every_row = self.round % self.rounds_per_full_merge == 0
        for merger in self.mergers[:None if every_row else 1]:
            merger.merge(self.model.weights, start_all_reduce)
        run.weights_changed()
        run.tally.seconds += time.perf_counter() - start  # a rank's training words/s pays for its merges

    def settle(self) -> None:
        """Wait for every merge and merge what is left: all ranks hold the same weights."""
        for merger in self.mergers:
            merger.settle(self.model.weights, all_reduce_sum)
        if self.run is not None:
            self.run.weights_changed()

    def validate(self) -> Tally:
        local = evaluate(self.model, self.valid_words) if self.valid_words else Tally()
        return tally_sum(local)

    def epoch_tally(self, tally: Tally) -> Tally:
        start = time.perf_counter()
        self.settle()
        tally.seconds += time.perf_counter() - start
        return tally_sum(tally)

    def finish_epoch(self, train_tally: Tally) -> None:
        super().finish_epoch(train_tally)
        self.reset_mergers()  # restored weights are the next base

    def reset_mergers(self) -> None:
        for merger in self.mergers:
            merger.reset(self.model.weights)


@dataclass
class Launch:
    """How this process was started: alone (rank 0 of 1), or as one rank under torchrun."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls) -> "Launch":
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes_files(self) -> bool:
        return self.rank == 0

    def train(self, model: RNNLM, train_words: list[str], valid_words: list[str], threads: int,
              progress: Callable | None = None, on_epoch: Callable[[EpochReport], None] | None = None, *,
              sync_words: int = SYNC_WORDS, sync_all_words: int | None = None, merge_rule: str = "sparse-sum", checkpoint: str | None = None,
              checkpoint_words: int | None = None, resume: bool = False) -> TrainReport:
        """Train, alone or as this rank; with `checkpoint`, write training checkpoints there (and with
        `resume`, continue from it when it exists)."""
        if not self.writes_files:  # one progress display for the whole group
            progress = on_epoch = None
        if self.distributed:
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=TIMEOUT,
                                    store=self.store())
        try:
            return self._train(model, train_words, valid_words, threads, progress, on_epoch, sync_words,
                               sync_all_words, merge_rule, checkpoint, checkpoint_words, resume)
        finally:
            if self.distributed:
                dist.destroy_process_group()

    def _train(self, model, train_words, valid_words, threads, progress, on_epoch, sync_words, sync_all_words, merge_rule,
               checkpoint, checkpoint_words, resume) -> TrainReport:
        text = text_digest(train_words)
        writer = self.checkpoint_writer(checkpoint, text) if checkpoint else None
        options = dict(progress=progress, on_epoch=on_epoch, checkpoint=writer, checkpoint_words=checkpoint_words)
        if self.distributed:
            sync_all_words = sync_all_words or default_sync_all_words(self.world_size, sync_words)
            trainer = DistributedTrainer(self.rank, self.world_size, sync_words, sync_all_words, merge_rule, model,
                                         train_words, valid_words, threads, **options)
        else:
            trainer = Trainer(model, train_words, valid_words, threads, **options)
        if resume and checkpoint:
            payload = self.read_checkpoint(checkpoint)
            if payload is not None:
                restore(trainer, payload, text, self.world_size, self.rank, checkpoint)
                if self.distributed:
                    trainer.reset_mergers()
                if self.writes_files:
                    inside = f", word {trainer.run.position * threads:,} of each part" if trainer.run else ""
                    say(f"resumed from {checkpoint} at epoch {trainer.schedule.epoch}{inside}")
        return trainer.train()

    def store(self) -> dist.Store | None:
        """The rendezvous store for the process group; None: torch's own (env://).

        torchrun hands its workers its own TCPStore (TORCHELASTIC_USE_AGENT_STORE), which outlives
        a restart of the group: without a prefix per attempt, the restarted ranks read the dead
        ones' addresses and gloo's connect is refused. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in
        torchrun's environment avoids the shared store altogether (the Kubernetes job sets it).
        """
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return None
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world_size,
                              is_master=False, timeout=TIMEOUT)
        return dist.PrefixStore(f"rnnlm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)

    def read_checkpoint(self, path: str) -> dict | None:
        """Rank 0 reads the checkpoint (None if there is none yet) and hands it to every rank."""
        payload = load_training(path) if self.writes_files and Path(path).exists() else None
        if self.distributed:
            box = [payload]
            dist.broadcast_object_list(box, src=0)
            payload = box[0]
        return payload

    def checkpoint_writer(self, path: str, text: str) -> Callable[[Trainer], None]:
        def write(trainer: Trainer) -> None:
            runs = None
            if trainer.run is not None:
                if self.distributed:
                    trainer.settle()  # rank 0 writes its weights for all
                mine = run_to_state(trainer.run)
                if self.distributed:
                    gathered = [None] * self.world_size if self.writes_files else None
                    dist.gather_object(mine, gathered, dst=0)
                    runs = gathered
                else:
                    runs = [mine]
            if self.writes_files:
                save_training(path, training_payload(trainer, text, self.world_size, runs))
            if self.distributed:
                dist.barrier()  # no rank runs ahead of a checkpoint that is not yet on disk
        return write
