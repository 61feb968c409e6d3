"""One rank of a test run under torchrun (tests/test_distributed.py); writes what it holds to OUT/rank<R>.npz.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py merge OUT
    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py train OUT TRAIN VALID SYNC_WORDS
"""

import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from rnnlm.corpus import read_tokens
from rnnlm.distributed import MERGE_RULES, Launch, WeightMerger, all_reduce_sum, start_all_reduce
from rnnlm.model import RNNLM, Config, Weights
from rnnlm.vocab import Vocabulary


def merge(out: Path) -> None:
    """Two overlapped merges and a settle by each rule, of weights that differ by rank, through the real all_reduce."""
    dist.init_process_group("gloo")
    for rule in MERGE_RULES:
        merge_twice(out, rule)
    dist.destroy_process_group()


def merge_twice(out: Path, rule: str) -> None:
    rank, size = dist.get_rank(), dist.get_world_size()
    base = Weights.random(30, 6, 4, 0.1, seed=0)
    weights = base.copy()
    merger = WeightMerger(weights, size, rule)
    moved = {}
    for round_ in range(2):
        noise = Weights.random(30, 6, 4, 0.1, seed=100 + 10 * round_ + rank)
        for name in Weights.NAMES:
            getattr(weights, name)[rank:-2:3] += getattr(noise, name)[rank:-2:3]  # each rank moves some rows
        moved.update({f"moved{round_}_{n}": a.copy() for n, a in weights.arrays().items()})
        merger.merge(weights, start_all_reduce)
    merger.settle(weights, all_reduce_sum)
    np.savez(out / f"{rule}-rank{rank}.npz", **moved, **{f"base_{n}": a for n, a in base.arrays().items()},
             **weights.arrays())


def train(out: Path, train_file: str, valid_file: str, sync_words: str) -> None:
    launch = Launch.from_environment()
    words, valid = read_tokens(train_file), read_tokens(valid_file)
    model = RNNLM.create(Config(hidden=16, classes=5, max_epochs=3), Vocabulary.build(words, num_classes=5))
    report = launch.train(model, words, valid, threads=1, sync_words=int(sync_words))
    np.savez(out / f"rank{launch.rank}.npz", valid_loss=report.best_valid.loss_nats, **model.weights.arrays())


if __name__ == "__main__":
    mode, out, *rest = sys.argv[1:]
    {"merge": merge, "train": train}[mode](Path(out), *rest)
