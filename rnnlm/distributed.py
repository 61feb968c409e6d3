"""`rnnlm train` on several processes and machines: torch.distributed (gloo) moves the bytes, the
compiled step (rnnlm/kernels.py) still does all the learning.

Under torchrun (RANK and WORLD_SIZE in the environment) each process, a *rank*, learns from its own
part of the training text, cut at sentence ends, with its own threads, exactly as one process does
(rnnlm/train.py). Every `sync_words` words per rank the ranks merge their weights with
`all_reduce` (see WeightMerger), so all ranks hold the same weights, bit for bit, after every
merge. Validation is counted by all ranks on their parts of the validation text and summed, so
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
SYNC_WORDS = 1024  # words per rank between merges: chosen by measurement (docs/distributed-training.md)
TIMEOUT = timedelta(minutes=10)  # a rank that waits this long for the others gives up


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
    """Brings the ranks' weights together by all_reduce: each rank sends its deltas since the last
    merge (the base), and every rank adds the same result to the base.

    "sparse-sum" (the default) is the two-thread recipe one level up: W and X, updated at every
    word by every rank, get the mean of the deltas; U, V and D keep every rank's update, base + Σ
    (rank's weights - base). "mean" averages all of them (Kaldi's model averaging), which on PTB
    learns too slowly at the same rate (docs/distributed-training.md).

    The arrays in `by_rows` (U: a row per input word) travel as the rows some rank changed since
    the last merge, a small part of them between frequent merges: one all_reduce of the other
    arrays and a flag per row of these, then one of the flagged rows.
    """

    def __init__(self, weights: Weights, world_size: int, rule: str = "sparse-sum", by_rows: tuple[str, ...] = ()):
        if rule not in MERGE_RULES:
            raise ValueError(f"merge rule must be one of {', '.join(MERGE_RULES)}, not {rule!r}")
        self.world_size, self.rule = world_size, rule
        arrays = weights.arrays()
        self.base = {name: a.copy() for name, a in arrays.items()}
        self.by_rows = tuple(n for n in by_rows if n in arrays)
        shapes = {**{n: a.shape for n, a in arrays.items() if n not in self.by_rows},
                  **{n: (arrays[n].shape[0],) for n in self.by_rows}}
        self.flat = torch.empty(sum(int(np.prod(shape)) for shape in shapes.values()), dtype=torch.float32)
        self.segments, self.changed = {}, {}
        offset = 0
        for name, shape in shapes.items():
            size = int(np.prod(shape))
            view = self.flat.numpy()[offset:offset + size].reshape(shape)
            (self.changed if name in self.by_rows else self.segments)[name] = view
            offset += size

    def scale(self, name: str) -> np.float32:
        """What a merged array gets of the summed deltas: all (summed) or 1/N (averaged)."""
        summed = self.rule == "sparse-sum" and name in SPARSE
        return np.float32(1 if summed else 1 / self.world_size)

    def pack(self, weights: Weights) -> None:
        for name, segment in self.segments.items():
            np.subtract(getattr(weights, name), self.base[name], out=segment)
        for name, flags in self.changed.items():
            flags[:] = (getattr(weights, name) != self.base[name]).any(axis=1)

    def unpack(self, weights: Weights) -> None:
        for name, segment in self.segments.items():
            own, base = getattr(weights, name), self.base[name]
            segment *= self.scale(name)
            np.add(base, segment, out=own)
            np.copyto(base, own)

    def merge(self, weights: Weights, reduce: Callable[[torch.Tensor], None]) -> None:
        """`reduce` sums a buffer over all ranks in place (dist.all_reduce)."""
        self.pack(weights)
        reduce(self.flat)
        self.unpack(weights)
        for name, flags in self.changed.items():
            self.merge_rows(getattr(weights, name), self.base[name], np.flatnonzero(flags), self.scale(name), reduce)

    @staticmethod
    def merge_rows(own: np.ndarray, base: np.ndarray, rows: np.ndarray, scale: np.float32,
                   reduce: Callable[[torch.Tensor], None]) -> None:
        """Merge the rows `rows` (changed by some rank; every rank has the same list) of one array."""
        if not len(rows):  # no rank changed any: every rank skips the all_reduce alike
            return
        deltas = torch.from_numpy(own[rows] - base[rows])
        reduce(deltas)
        base[rows] += deltas.numpy() * scale
        own[rows] = base[rows]

    def reset(self, weights: Weights) -> None:
        """The weights were set from outside (restored, resumed): they are the new base."""
        for name, base in self.base.items():
            np.copyto(base, getattr(weights, name))


def all_reduce_sum(tensor: torch.Tensor) -> None:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def tally_sum(tally: Tally) -> Tally:
    """The tallies of all ranks added up (seconds: the slowest rank's)."""
    totals = torch.tensor([tally.words, tally.oov, tally.rare, tally.loss_nats], dtype=torch.float64)
    all_reduce_sum(totals)
    seconds = torch.tensor([tally.seconds], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    words, oov, rare, loss = totals.tolist()
    return Tally(int(words), int(oov), int(rare), loss, float(seconds.item()))


class DistributedTrainer(Trainer):
    """A rank's Trainer: its part of the text, merges at every pause, validation summed over ranks."""

    def __init__(self, rank: int, world_size: int, sync_words: int, merge_rule: str, model: RNNLM,
                 train_words: list[str], valid_words: list[str], threads: int, **kwargs):
        self.rank, self.world_size, self.sync_words = rank, world_size, sync_words
        super().__init__(model, train_words, valid_words, threads, **kwargs)
        self.merger = WeightMerger(model.weights, world_size, merge_rule, by_rows=("U",))
        lo, hi = sentence_bounds(np.array([w == EOS for w in valid_words]), world_size)[rank]
        self.valid_words = valid_words[lo:hi]

    def own_part(self, ids: np.ndarray) -> np.ndarray:
        return sentence_parts(ids, self.model.vocab.eos_id, self.world_size)[self.rank]

    def pause_every(self) -> int:
        return -(-self.sync_words // self.threads)

    def rounds_needed(self, run: EpochRun, step: int) -> int:
        rounds = torch.tensor([super().rounds_needed(run, step)], dtype=torch.int64)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        return int(rounds.item())

    def between_rounds(self, run: EpochRun) -> None:
        start = time.perf_counter()
        self.merger.merge(self.model.weights, all_reduce_sum)
        run.weights_changed()
        run.tally.seconds += time.perf_counter() - start  # a rank's training words/s pays for its merges

    def validate(self) -> Tally:
        local = evaluate(self.model, self.valid_words) if self.valid_words else Tally()
        return tally_sum(local)

    def epoch_tally(self, tally: Tally) -> Tally:
        return tally_sum(tally)

    def finish_epoch(self, train_tally: Tally) -> None:
        super().finish_epoch(train_tally)
        self.merger.reset(self.model.weights)  # restored weights are the next base


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
              sync_words: int = SYNC_WORDS, merge_rule: str = "sparse-sum", checkpoint: str | None = None,
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
                               merge_rule, checkpoint, checkpoint_words, resume)
        finally:
            if self.distributed:
                dist.destroy_process_group()

    def _train(self, model, train_words, valid_words, threads, progress, on_epoch, sync_words, merge_rule,
               checkpoint, checkpoint_words, resume) -> TrainReport:
        text = text_digest(train_words)
        writer = self.checkpoint_writer(checkpoint, text) if checkpoint else None
        options = dict(progress=progress, on_epoch=on_epoch, checkpoint=writer, checkpoint_words=checkpoint_words)
        if self.distributed:
            trainer = DistributedTrainer(self.rank, self.world_size, sync_words, merge_rule, model, train_words,
                                         valid_words, threads, **options)
        else:
            trainer = Trainer(model, train_words, valid_words, threads, **options)
        if resume and checkpoint:
            payload = self.read_checkpoint(checkpoint)
            if payload is not None:
                restore(trainer, payload, text, self.world_size, self.rank, checkpoint)
                if self.distributed:
                    trainer.merger.reset(model.weights)
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
