"""What a daemon domain's direct weights cost, as copy-on-write blocks of the base's D (rnnlm/direct.py).

    .venv/bin/python bench/bench_direct_blocks.py model --direct 10 --out runs/ptb-direct-10.pt
    .venv/bin/python bench/bench_direct_blocks.py growth --model runs/ptb-direct-10.pt
    .venv/bin/python bench/bench_direct_blocks.py speed --model runs/ptb-direct-10.pt [--repeats 2]
    .venv/bin/python bench/bench_direct_blocks.py daemon --model runs/ptb-direct-10.pt [--domains 16 --words 2000]

`model` writes an untrained model of PTB's sizes (vocabulary, H=200, 100 classes) with --direct
million direct weights of order 4 (small random values: which blocks a domain writes depends on
the hashes of its histories, not on the values). `growth` streams PTB test into one domain's copy
(online rule, 0.01) and prints what its D costs after each number of words. `speed` times the
step, one thread, in one process: training (the model's own D, α 0.1, BPTT 4 / block 10, on PTB
train) and the online step over PTB test with a full copy of the weights and, where the code has
it, with a domain's copy-on-write copy. `daemon` starts `rnnlm serve --model`, streams --words
words of PTB test into each of --domains domains and prints RSS idle and after.

`speed` and `daemon` run on whichever rnnlm is imported: point PYTHONPATH at an older tree (git
archive) to measure before and after on the same machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import rnnlm
from rnnlm.checkpoint import load_model, save_model
from rnnlm.corpus import read_tokens
from rnnlm.model import RNNLM, Config, OnlineRule
from rnnlm.vocab import Vocabulary

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "ptb"
TRAINING = OnlineRule(lr=0.1, l2=1e-7, direct_l2=1e-3, bptt=4, block=10)
ONLINE = OnlineRule(lr=0.01, direct_rate=16.0)


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


def make_model(args) -> None:
    vocab = Vocabulary.build(read_tokens(str(DATA / "ptb.train.txt")), num_classes=100)
    model = RNNLM.create(Config(hidden=200, classes=100, direct=args.direct, direct_order=4), vocab)
    model.weights.D[:] = np.random.default_rng(1).normal(scale=0.01, size=model.weights.D.size)
    save_model(model, args.out)
    print(f"{args.out}: {model.describe()}, {Path(args.out).stat().st_size / 2 ** 20:.1f} MB")


def growth(args) -> None:
    from rnnlm.direct import BLOCK
    model = load_model(args.model)
    words = read_tokens(str(DATA / "ptb.test.txt"))
    weights = model.weights.adapted_copy()
    state = model.new_state(ONLINE)
    full = model.weights.D.nbytes
    print(f"{args.model}: D {full / 2 ** 20:.1f} MB ({model.config.direct_size:,} weights), blocks of "
          f"{BLOCK} weights; one domain streaming PTB test at 0.01 (load {load()})")
    print("| words streamed | blocks copied | of all blocks | domain's D (table + blocks) | of a full copy |")
    print("|---|---|---|---|---|")
    done = 0
    for mark in (100, 1_000, 10_000, 30_000, len(words)):
        ids, _ = model.vocab.encode(words[done:mark])
        model.step(ids, state, ONLINE, weights)
        done = mark
        own = weights.D_own
        print(f"| {done:,} | {own.count:,} | {100 * own.count / own.table.size:.1f} % | "
              f"{own.nbytes / 2 ** 20:.2f} MB | {100 * own.nbytes / full:.1f} % |")


def words_per_sec(model: RNNLM, ids: np.ndarray, rule: OnlineRule, weights) -> str:
    """Words per second of wall time and per second of this process's CPU time (steadier on a shared machine)."""
    state = model.new_state(rule)
    wall, cpu = time.perf_counter(), time.process_time()
    model.step(ids, state, rule, weights)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return f"{len(ids) / wall:,.0f} ({len(ids) / cpu:,.0f} per CPU s)"


def speed(args) -> None:
    model = load_model(args.model)
    train_ids, _ = model.vocab.encode(read_tokens(str(DATA / "ptb.train.txt"))[:args.train_words])
    test_ids, _ = model.vocab.encode(read_tokens(str(DATA / "ptb.test.txt")))
    cow = hasattr(model.weights, "adapted_copy")
    words_per_sec(model, test_ids[:50], ONLINE, model.weights.copy())  # compile / load the compiled step
    print(f"{rnnlm.__file__}; load {load()}")
    for r in range(args.repeats):
        trained = words_per_sec(model, train_ids, TRAINING, model.weights)
        flat = words_per_sec(model, test_ids, ONLINE, model.weights.copy())
        line = f"round {r + 1}: words/s training (own D) {trained}; online, full copy {flat}"
        if cow:
            adapted = words_per_sec(model, test_ids, ONLINE, model.weights.adapted_copy())
            line += f"; online, copy-on-write copy {adapted}"
        print(f"{line}  load {load()}", flush=True)


def daemon(args) -> None:
    sys.path.insert(0, str(HERE))
    from daemon_process import rss_mb, start_daemon
    from rnnlm.clients.client import Client

    words = read_tokens(str(DATA / "ptb.test.txt"))
    work = Path(tempfile.mkdtemp(prefix="bench-direct-blocks-"))
    proc, ports = start_daemon(work, ["--model", args.model, "--max-domains", str(args.domains + 1)])
    try:
        with Client(ports["endpoint"]) as client:
            client.score("the market fell", stream="warm", learn=False)
            time.sleep(1)
            idle = rss_mb(proc.pid)
            for d in range(args.domains):
                text = words[d * args.words:(d + 1) * args.words]
                for i in range(0, len(text), 50):
                    client.score(" ".join(text[i:i + 50]), stream=f"s{d}", domain=f"d{d}")
            time.sleep(0.5)
            adapted = rss_mb(proc.pid)
        print(f"daemon RSS with {args.model} ({rnnlm.__file__}): idle {idle:.0f} MB; {args.domains} domains "
              f"after {args.words:,} words each {adapted:.0f} MB ({(adapted - idle) / args.domains:.1f} MB each)  "
              f"load {load()}", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["model", "growth", "speed", "daemon"])
    parser.add_argument("--direct", type=float, default=10.0, help="model: millions of direct weights")
    parser.add_argument("--out", default="runs/ptb-direct.pt", help="model: where to write it")
    parser.add_argument("--model", default="runs/ptb-direct.pt")
    parser.add_argument("--repeats", type=int, default=2, help="speed: rounds")
    parser.add_argument("--train-words", type=int, default=100_000, help="speed: PTB training words per round")
    parser.add_argument("--domains", type=int, default=16, help="daemon: adapted domains")
    parser.add_argument("--words", type=int, default=2000, help="daemon: words streamed into each domain")
    args = parser.parse_args()
    {"model": make_model, "growth": growth, "speed": speed, "daemon": daemon}[args.mode](args)


if __name__ == "__main__":
    main()
