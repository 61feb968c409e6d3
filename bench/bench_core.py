"""Core benchmark on the Penn Treebank: training time, static/dynamic perplexity, online-step speed.

    .venv/bin/python bench/bench_core.py [--data ../shared/data/ptb] [--model runs/ptb200.pt]

Trains at the reference toolkit's configuration (hidden 200, 100 classes, BPTT 4 in blocks of 10,
the default recipe) unless --model names an existing model, then measures in the same process.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from rnnlm.checkpoint import load_model, save_model
from rnnlm.corpus import read_tokens
from rnnlm.evaluate import evaluate
from rnnlm.model import RNNLM, Config, OnlineRule
from rnnlm.train import train
from rnnlm.vocab import Vocabulary

REPO = Path(__file__).resolve().parent.parent
TOOLKIT = {"train_minutes": 11.1, "static": 143.4, "dynamic": 132.4, "dynamic_wps": 3600, "train_wps": 20000}
TARGET = {"train_minutes": 5.5, "static": 139.0, "dynamic": 130.0, "online_wps": 20000, "rss_mb": 1500}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def online_step_one_word_at_a_time(model: RNNLM, words: list[str], rule: OnlineRule) -> tuple[float, float]:
    """Words/s and perplexity calling the online step once per word (all Python overhead included)."""
    ids, _ = model.vocab.encode(words)
    weights, state = model.weights.copy(), model.new_state(rule)
    loss = 0.0
    start = time.perf_counter()
    for i in range(len(ids)):
        logp, _ = model.step(ids[i:i + 1], state, rule, weights)
        loss -= logp[0]
    seconds = time.perf_counter() - start
    return len(ids) / seconds, float(np.exp(loss / len(ids)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ptb"))
    parser.add_argument("--model", default=None, help="use this model instead of training one")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-ptb200.pt"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1, help="seed of the initial weights (run-to-run spread)")
    args = parser.parse_args()
    data = Path(args.data)
    train_words = read_tokens(data / "ptb.train.txt")
    valid_words = read_tokens(data / "ptb.valid.txt")
    test_words = read_tokens(data / "ptb.test.txt")
    print(f"PTB: {len(train_words):,} training words, {len(test_words):,} test words (</s> counted); "
          f"{os.cpu_count()} CPUs", flush=True)

    train_minutes = train_wps = None
    if args.model:
        model = load_model(args.model)
        print(f"model {args.model} (not trained in this run)")
    else:
        config = Config(hidden=200, classes=100, bptt=4, bptt_block=10, seed=args.seed)
        start = time.perf_counter()
        model = RNNLM.create(config, Vocabulary.build(train_words, config.min_count, config.classes))

        def on_epoch(e):
            print(f"  epoch {e.epoch:2d}  α {e.lr:.5f}  {e.train.words_per_sec:7,.0f} words/s  "
                  f"valid {e.valid.perplexity:7.2f}{'' if e.kept else '  (restored)'}", flush=True)

        report = train(model, train_words, valid_words, threads=args.threads, on_epoch=on_epoch)
        train_minutes = (time.perf_counter() - start) / 60
        train_wps = report.words_per_sec
        save_model(model, args.out)
        print(f"trained: {len(report.epochs)} epochs in {train_minutes:.2f} min wall "
              f"(vocabulary, validation and all), {train_wps:,.0f} training words/s with {args.threads} threads, "
              f"peak RSS {peak_rss_mb():.0f} MB; saved {args.out}", flush=True)

    static = evaluate(model, test_words)
    print(f"static test perplexity {static.perplexity:.2f} ({static.words:,} words, OOV {static.oov}), "
          f"{static.words_per_sec:,.0f} words/s", flush=True)
    dynamic_rows = []
    for bptt in (0, 1, 2, 4):
        rule = OnlineRule(lr=0.01, bptt=bptt)
        tally = evaluate(model, test_words, rule, weights=model.weights.copy())
        dynamic_rows.append((bptt, tally))
        mark = "  <- default" if bptt == OnlineRule().bptt else ""
        print(f"dynamic 0.01, τ={bptt + 1}: test perplexity {tally.perplexity:.2f}, "
              f"{tally.words_per_sec:,.0f} words/s (one thread){mark}", flush=True)
    dynamic = next(t for b, t in dynamic_rows if b == OnlineRule().bptt)
    one_word_wps, one_word_ppl = online_step_one_word_at_a_time(model, test_words, OnlineRule())
    print(f"online step called once per word: {one_word_wps:,.0f} words/s, perplexity {one_word_ppl:.2f} "
          f"(same step, same result)", flush=True)

    print("\n| measure | this run | toolkit -O3 | target |")
    print("|---|---|---|---|")
    if train_minutes is not None:
        print(f"| training wall time (min) | {train_minutes:.2f} | {TOOLKIT['train_minutes']} | ≤ {TARGET['train_minutes']} |")
        print(f"| training words/s | {train_wps:,.0f} | ~{TOOLKIT['train_wps']:,} | |")
        print(f"| training peak RSS (MB) | {peak_rss_mb():.0f} | 475 | ≤ {TARGET['rss_mb']} |")
    print(f"| static test perplexity | {static.perplexity:.2f} | {TOOLKIT['static']} | ≤ {TARGET['static']} |")
    print(f"| dynamic (0.01) test perplexity | {dynamic.perplexity:.2f} | {TOOLKIT['dynamic']} | ≤ {TARGET['dynamic']} |")
    print(f"| online step words/s (one thread, in-process stream) | {dynamic.words_per_sec:,.0f} | ~{TOOLKIT['dynamic_wps']:,} | ≥ {TARGET['online_wps']:,} |")
    print(f"| online step words/s (one call per word) | {one_word_wps:,.0f} | | ≥ {TARGET['online_wps']:,} |")


if __name__ == "__main__":
    sys.exit(main())
