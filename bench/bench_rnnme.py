"""RNNME: direct connections (hashed n-gram features) beside the network, on PTB or WikiText-2.

    .venv/bin/python bench/bench_rnnme.py ablation [--words 300000] [--runs none,10:3:0,...]
    .venv/bin/python bench/bench_rnnme.py recipe --direct 10 --direct-order 4 --direct-l2 1e-3 --direct-rate 0.5 \
        --dynamic-direct-rate 16 --kn5 kn5.arpa [--model m.pt]
    .venv/bin/python bench/bench_rnnme.py recipe --corpus wikitext-2 --compare-plain --direct 100 ... \
        [--valid-direct-rates 4,16,32]

`ablation` trains short runs on the first --words words of the training text (H=200, 100 classes,
BPTT 4, at most --epochs epochs) and reports validation perplexity, static and dynamic (0.01), with
training words/s and the size of the model: one row per direct setting SIZE:ORDER:L2[:RATE]
("none" = the plain network). `recipe` trains on the whole text (or loads --model) and measures
the targets on test: static, dynamic, dynamic + KN5 (0.75/0.25, through `rnnlm eval`), the online
step on one thread, the model file, and the memory of 16 adapted copies. `--compare-plain` first
trains (or loads, --plain-model) the same network without direct connections and ends with one
table of both; `--valid-direct-rates` scores validation dynamically with the direct weights online
at each of these multiples of 0.01 (to choose one without looking at test). The daemon's RSS with
adapted domains: `bench/bench_direct_blocks.py daemon --model M`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from rnnlm.checkpoint import load_model, save_model
from rnnlm.corpus import read_tokens
from rnnlm.evaluate import evaluate
from rnnlm.model import RNNLM, Config, OnlineRule, Weights
from rnnlm.train import train
from rnnlm.vocab import Vocabulary

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
DYNAMIC = OnlineRule(lr=0.01)
CORPORA = {"ptb": "ptb.", "wikitext-2": ""}  # corpus folder -> prefix of its train/valid/test.txt


def corpus_file(args, split: str) -> Path:
    folder = Path(args.data) if args.data else DATA / args.corpus
    return folder / f"{CORPORA[args.corpus]}{split}.txt"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


def direct_setting(text: str) -> dict:
    """'none' or SIZE:ORDER:L2[:RATE] as Config fields."""
    if text == "none":
        return {}
    size, order, l2, *rate = text.split(":")
    return {"direct": float(size), "direct_order": int(order), "direct_l2": float(l2),
            "direct_rate": float(rate[0]) if rate else 1.0}


def train_model(train_words, valid_words, setting: dict, threads: int, max_epochs: int, seed: int, verbose: bool):
    config = Config(hidden=200, classes=100, bptt=4, bptt_block=10, seed=seed, max_epochs=max_epochs, **setting)
    model = RNNLM.create(config, Vocabulary.build(train_words, config.min_count, config.classes))

    def on_epoch(e):
        if verbose:
            print(f"  epoch {e.epoch:2d}  α {e.lr:.5f}  {e.train.words_per_sec:7,.0f} words/s  "
                  f"valid {e.valid.perplexity:7.2f}{'' if e.kept else '  (restored)'}  load {load()}", flush=True)

    start = time.perf_counter()
    report = train(model, train_words, valid_words, threads=threads, on_epoch=on_epoch)
    return model, report, (time.perf_counter() - start) / 60


def ablation(args) -> None:
    train_words = read_tokens(corpus_file(args, "train"))[:args.words]
    valid_words = read_tokens(corpus_file(args, "valid"))
    print(f"ablation: first {len(train_words):,} training words, valid {len(valid_words):,}, "
          f"at most {args.epochs} epochs, {args.threads} threads; {os.cpu_count()} CPUs", flush=True)
    print("| direct (M) | order | L2 | rate | valid static | valid dynamic | epochs | train words/s | minutes | D MB | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for text in args.runs.split(","):
        setting = direct_setting(text)
        model, report, minutes = train_model(train_words, valid_words, setting, args.threads, args.epochs,
                                             args.seed, args.verbose)
        static = evaluate(model, valid_words)
        dynamic = evaluate(model, valid_words, DYNAMIC, weights=model.weights.copy())
        cfg = model.config
        print(f"| {cfg.direct if cfg.direct_size else '-'} | {cfg.direct_features or '-'} | "
              f"{cfg.direct_l2 if cfg.direct_size else '-'} | {cfg.direct_rate if cfg.direct_size else '-'} | "
              f"{static.perplexity:.2f} | {dynamic.perplexity:.2f} | {len(report.epochs)} | "
              f"{report.words_per_sec:,.0f} | {minutes:.2f} | {model.weights.D.nbytes / 2**20:.0f} | {load()} |",
              flush=True)


def eval_cli(model_path: Path, test: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "rnnlm", "eval", "--model", str(model_path), "--test", str(test), "--json", *extra]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def adapted_domains_rss(model: RNNLM, words: list[str], domains: int, rule: OnlineRule) -> float:
    """RSS after `domains` adapted copies of the weights (as the daemon makes them: direct weights
    copied block by block as they change), each having learned from 2,000 words."""
    copies = []
    for d in range(domains):
        weights = model.weights.adapted_copy()
        evaluate(model, words[d * 2000:(d + 1) * 2000], rule, weights=weights)
        copies.append(weights)
    return rss_mb()


def trained_or_loaded(args, train_words, valid_words, setting: dict, load_path: str | None, out: Path):
    """(model, its file, training row fields) — the fields are None for a model loaded from a file."""
    if load_path:
        print(f"model {load_path} (not trained in this run)", flush=True)
        return load_model(load_path), Path(load_path), None
    model, report, minutes = train_model(train_words, valid_words, setting, args.threads, 20, args.seed, True)
    save_model(model, out)
    print(f"trained: {len(report.epochs)} epochs in {minutes:.2f} min wall, {report.words_per_sec:,.0f} words/s "
          f"with {args.threads} threads, peak RSS {peak_rss_mb():.0f} MB; saved {out}", flush=True)
    return model, out, {"minutes": minutes, "epochs": len(report.epochs), "words_per_sec": report.words_per_sec}


def dynamic_with_direct_rate(model: RNNLM, words: list[str], direct_rate: float):
    return evaluate(model, words, OnlineRule(lr=0.01, direct_rate=direct_rate), weights=model.weights.copy())


def comparison_row(name: str, path: Path, training: dict | None, static, dynamic, tuned) -> str:
    train_cells = (f"{training['minutes']:.1f} | {training['epochs']} | {training['words_per_sec']:,.0f}"
                   if training else "- | - | -")
    return (f"| {name} | {static.perplexity:.2f} | {dynamic.perplexity:.2f} | "
            f"{f'{tuned.perplexity:.2f}' if tuned else '-'} | {train_cells} | {path.stat().st_size / 2**20:.1f} |")


def plain_network_row(args, train_words, valid_words, test_words, out: Path) -> str:
    """Train (or load) the same network without direct connections; its row of the comparison."""
    plain, path, training = trained_or_loaded(args, train_words, valid_words, {}, args.plain_model,
                                              out.with_name(f"{out.stem}-plain.pt"))
    print(f"plain model: {json.dumps(plain.describe())}", flush=True)
    static = evaluate(plain, test_words)
    dynamic = evaluate(plain, test_words, DYNAMIC, weights=plain.weights.copy())
    print(f"plain network: test perplexity {static.perplexity:.2f} static, {dynamic.perplexity:.2f} dynamic 0.01  "
          f"load {load()}", flush=True)
    return comparison_row("RNN", path, training, static, dynamic, None)


def print_comparison(args, rnnme: Config, rows: list[str]) -> None:
    print(f"\n{args.corpus} test, H={rnnme.hidden}, {rnnme.classes} classes, BPTT {rnnme.bptt}; RNNME = --direct "
          f"{rnnme.direct:g} --direct-order {rnnme.direct_order} --direct-l2 {rnnme.direct_l2:g} "
          f"--direct-rate {rnnme.direct_rate:g}; trained with {args.threads} threads")
    rate = args.dynamic_direct_rate if args.dynamic_direct_rate is not None else "-"
    print(f"| model | static | dynamic 0.01 | dynamic 0.01, direct weights at {rate} × 0.01 | "
          "training minutes | epochs | train words/s | model file MB |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows), flush=True)


def recipe(args) -> None:
    train_words = read_tokens(corpus_file(args, "train"))
    valid_words = read_tokens(corpus_file(args, "valid"))
    test_words = read_tokens(corpus_file(args, "test"))
    out = Path(args.out)
    print(f"{args.corpus}: {len(train_words):,} training words, {len(test_words):,} test words; "
          f"{os.cpu_count()} CPUs, load {load()}", flush=True)
    plain_row = plain_network_row(args, train_words, valid_words, test_words, out) if args.compare_plain else None
    setting = {"direct": args.direct, "direct_order": args.direct_order, "direct_l2": args.direct_l2,
               "direct_rate": args.direct_rate}
    model, out, training = trained_or_loaded(args, train_words, valid_words, setting, args.model, out)
    print(f"model: {json.dumps(model.describe())}; file {out.stat().st_size / 2**20:.1f} MB")
    for rate in args.valid_direct_rates:
        tally = dynamic_with_direct_rate(model, valid_words, rate)
        print(f"validation, dynamic 0.01, direct weights at {rate} × 0.01: perplexity {tally.perplexity:.2f}  "
              f"load {load()}", flush=True)
    static = evaluate(model, test_words)
    print(f"static test perplexity {static.perplexity:.2f}  load {load()}", flush=True)
    dynamic = evaluate(model, test_words, DYNAMIC, weights=model.weights.copy())
    print(f"dynamic 0.01 test perplexity {dynamic.perplexity:.2f}, online step {dynamic.words_per_sec:,.0f} words/s "
          f"(one thread)  load {load()}", flush=True)
    online = OnlineRule(lr=0.01, direct_rate=args.dynamic_direct_rate)
    tuned = None
    if args.dynamic_direct_rate is not None:
        tuned = dynamic_with_direct_rate(model, test_words, args.dynamic_direct_rate)
        print(f"dynamic 0.01, direct weights at {args.dynamic_direct_rate} × 0.01: test perplexity "
              f"{tuned.perplexity:.2f}, {tuned.words_per_sec:,.0f} words/s  load {load()}", flush=True)
    plain = RNNLM(replace(model.config, direct=0.0), model.vocab, Weights(**{n: getattr(model.weights, n) for n in Weights.NAMES}))
    without = evaluate(plain, test_words, DYNAMIC, weights=plain.weights.copy())
    again = evaluate(model, test_words, DYNAMIC, weights=model.weights.copy())
    print(f"online step, same run: {again.words_per_sec:,.0f} words/s with the direct features, "
          f"{without.words_per_sec:,.0f} words/s for the same network without them (perplexity {without.perplexity:.2f})",
          flush=True)
    if args.kn5:
        test = corpus_file(args, "test")
        rate = [] if args.dynamic_direct_rate is None else ["--dynamic-direct-rate", str(args.dynamic_direct_rate)]
        for extra in ([], ["--dynamic", "0.01", *rate]):
            result = eval_cli(out, test, ["--ngram", args.kn5, *extra])
            print(f"rnnlm eval --ngram {args.kn5} {' '.join(extra) or '(static)'}: "
                  f"test perplexity {result['perplexity']:.2f}  load {load()}", flush=True)
    base = rss_mb()
    rss = adapted_domains_rss(model, test_words, 16, online)
    print(f"RSS: {base:.0f} MB with the model loaded; {rss:.0f} MB with 16 adapted copies of the weights "
          f"({model.weights.D.nbytes / 2**20:.0f} MB of direct weights in the model, copied block by block)", flush=True)
    if plain_row:
        print_comparison(args, model.config, [plain_row, comparison_row("RNNME", out, training, static, dynamic, tuned)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["ablation", "recipe"])
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="ptb")
    parser.add_argument("--data", default=None, help="the corpus' folder (default: shared/data/CORPUS)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--words", type=int, default=300_000, help="ablation: training words used")
    parser.add_argument("--epochs", type=int, default=8, help="ablation: at most this many epochs")
    parser.add_argument("--runs", default="none,10:3:0,10:4:0,10:2:0,1:4:0,100:4:0,10:4:1e-5,10:4:0:0.5")
    parser.add_argument("--direct", type=float, default=10.0)
    parser.add_argument("--direct-order", type=int, default=4)
    parser.add_argument("--direct-l2", type=float, default=0.0)
    parser.add_argument("--direct-rate", type=float, default=1.0)
    parser.add_argument("--dynamic-direct-rate", type=float, default=None,
                        help="recipe: also measure dynamic with the direct weights at this multiple of 0.01")
    parser.add_argument("--model", default=None, help="recipe: measure this model instead of training one")
    parser.add_argument("--compare-plain", action="store_true",
                        help="recipe: also train and measure the network without direct connections; one table of both")
    parser.add_argument("--plain-model", default=None, help="recipe --compare-plain: load this plain model instead")
    parser.add_argument("--valid-direct-rates", type=lambda text: [float(r) for r in text.split(",")], default=[],
                        help="recipe: validation perplexity, dynamic, with the direct weights at each multiple of 0.01")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-rnnme.pt"))
    parser.add_argument("--kn5", default=None, help="recipe: ARPA file (rnnlm ngram build --order 5) to interpolate")
    args = parser.parse_args()
    {"ablation": ablation, "recipe": recipe}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
