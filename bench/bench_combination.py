"""Benchmark: RNN + KN5 interpolation, mixtures of RNNs, and n-best rescoring on the Penn Treebank.

    .venv/bin/python bench/bench_combination.py [--data /work/shared/data/ptb]
        [--main runs/mix/ptb200.pt] [--extra runs/mix/h300s3.pt --extra runs/mix/h400s4.pt]
        [--arpa runs/mix/kn5.arpa] [--rate 0.01] [--bptt 1] [--nbest 100] [--nbest-seed 0]
        [--nbest-sentences 0 (all)] [--no-rescoring]

Prints, in one run (issue 4's targets in brackets):

* KN5 alone [141.19, KenLM lmplz -o 5, ±1 %]; each RNN alone, static and dynamic;
* main RNN + KN5 at 0.75 / 0.25, static [≤ 115] and dynamic [≤ 110], and with the weights tuned
  by EM on ptb.valid.txt; each RNN + KN5 dynamic (tuned);
* all RNNs + KN5, all dynamic, weights tuned on valid [≤ 105, below the best single dynamic RNN+KN5];
* rescoring: 100-best lists generated from ptb.test.txt by `rnnlm.nbest.generate_nbest` (seed 0,
  confusions drawn from ptb.train.txt); the LM weight and word penalty are tuned for each LM on
  the first half of the utterances (a grid) and WER is reported on the second half
  [WER(KN5) > WER(RNN+KN5) ≥ oracle WER]. The RNN scores each hypothesis statically as a
  sentence of its own.

Dynamic components use OnlineRule(lr=--rate, bptt=--bptt), each adapting on its own from the
model's weights, on valid and on test separately. Build the inputs once:

    .venv/bin/rnnlm ngram build --order 5 --train ptb.train.txt --out runs/mix/kn5.arpa
    .venv/bin/rnnlm train --train ptb.train.txt --valid ptb.valid.txt --out runs/mix/h300s3.pt \
        --hidden 300 --seed 3 --threads 1          (and --hidden 400 --seed 4 for h400s4.pt)

The main model is the H=200 model of bench/bench_core.py (copied to runs/mix/ so it does not
change underneath). Measured results are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from rnnlm.checkpoint import load_model  # noqa: E402
from rnnlm.corpus import read_lines, read_tokens  # noqa: E402
from rnnlm.mixture import Mixture, NGramComponent, RNNComponent, em_weights  # noqa: E402
from rnnlm.model import OnlineRule  # noqa: E402
from rnnlm.nbest import align, generate_nbest, wer  # noqa: E402
from rnnlm.ngram import read_arpa  # noqa: E402

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Perplexities: every component scored once on valid and test, then mixed in any combination
# --------------------------------------------------------------------------------------------


class Table:
    """ln P rows of all components on valid and test; any subset mixes from these rows."""

    def __init__(self, components, valid, test):
        self.all = Mixture(components)
        self.names = [c.name for c in components]
        self.valid, self.test = valid, test
        log(f"event space: {len(self.all.words):,} words + U; catch-all shares {self.all.lumped}")
        self.rows = {}
        for split, tokens in (("valid", valid), ("test", test)):
            matrix, seconds = self.all.logprob_matrix(tokens)
            self.rows[split] = dict(zip(self.names, matrix))
            for name, s in zip(self.names, seconds):
                log(f"scored {split} with {name}: {len(tokens) / s:,.0f} words/s")

    def mixture(self, names):
        sub = Mixture([self.all.components[self.names.index(n)] for n in names])
        assert sub.lumped == [self.all.lumped[self.names.index(n)] for n in names], "vocabularies differ"
        return sub

    def perplexity(self, names, weights=None, tune=False):
        """Test perplexity of the mixture of `names` (weights given, uniform, or EM on valid)."""
        mixture = self.mixture(names)
        if tune:
            em = em_weights(np.vstack([self.rows["valid"][n] for n in names]))
            weights, self.tuned_valid = em.weights, em.perplexity
        if weights is not None:
            mixture.weights = np.asarray(weights, dtype=np.float64)
        score = mixture.summarise(np.vstack([self.rows["test"][n] for n in names]), self.test)
        return score.tally.perplexity, mixture.weights


def perplexity_report(table: Table, main: str, extras: list[str]) -> None:
    rows = []  # (label, perplexity, target text, passed or None)

    def add(label, ppl, target="", ok=None, weights=None):
        if weights is not None:
            label += "  λ=" + "/".join(f"{w:.3f}" for w in weights)
        if "tuned" in label:
            label += f" (valid {table.tuned_valid:.2f})"
        rows.append((label, ppl, target, ok))

    kn = table.perplexity(["kn5"])[0]
    add("KN5 alone", kn, "141.19 ±1 %", abs(kn / 141.19 - 1) <= 0.01)
    for name in [main, *extras]:
        add(f"{name} static", table.perplexity([f"{name}:static"])[0])
        add(f"{name} dynamic", table.perplexity([f"{name}:dynamic"])[0])

    static, _ = table.perplexity([f"{main}:static", "kn5"], [0.75, 0.25])
    dynamic, _ = table.perplexity([f"{main}:dynamic", "kn5"], [0.75, 0.25])
    add(f"{main} + KN5 static", static, "≤ 115", static <= 115, [0.75, 0.25])
    add(f"{main} + KN5 dynamic", dynamic, "≤ 110", dynamic <= 110, [0.75, 0.25])
    ppl, w = table.perplexity([f"{main}:static", "kn5"], tune=True)
    add(f"{main} + KN5 static, tuned on valid", ppl, weights=w)
    singles = {}
    for name in [main, *extras]:
        singles[name], w = table.perplexity([f"{name}:dynamic", "kn5"], tune=True)
        add(f"{name} + KN5 dynamic, tuned on valid", singles[name], weights=w)
    best_single = min(min(singles.values()), dynamic)
    ppl, w = table.perplexity([f"{main}:static", f"{main}:dynamic", "kn5"], tune=True)
    add(f"{main} static + dynamic + KN5, tuned", ppl, weights=w)

    names = [f"{n}:dynamic" for n in [main, *extras]] + ["kn5"]
    k = len(extras) + 1
    ppl, w = table.perplexity(names, [0.75 / k] * k + [0.25])
    add(f"{k} RNNs + KN5, all dynamic", ppl, weights=w)
    mix, w = table.perplexity(names, tune=True)
    add(f"{k} RNNs + KN5, all dynamic, tuned on valid", mix, f"≤ 105 and < {best_single:.2f}",
        mix <= 105 and mix < best_single, w)
    both = [f"{n}:{mode}" for n in [main, *extras] for mode in ("static", "dynamic")] + ["kn5"]
    ppl, w = table.perplexity(both, tune=True)
    add(f"{k} RNNs static + dynamic + KN5, tuned on valid", ppl, weights=w)

    print(f"\nPTB test perplexity ({len(table.test):,} tokens, </s> included; weights: RNNs first, KN5 last)")
    for label, ppl, target, ok in rows:
        verdict = "" if ok is None else ("  PASS" if ok else "  FAIL")
        print(f"  {label:<80s} {ppl:8.2f}   {target:>20s}{verdict}")


# --------------------------------------------------------------------------------------------
# Rescoring
# --------------------------------------------------------------------------------------------


class Lists:
    """All hypotheses flattened: acoustic score, length, errors, utterance segments."""

    def __init__(self, nbest, refs):
        self.utts = list(nbest)
        self.hyps = [h for u in self.utts for h in nbest[u]]
        self.sizes = np.array([len(nbest[u]) for u in self.utts])
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.acoustic = np.array([h.acoustic for h in self.hyps])
        self.length = np.array([len(h.words) for h in self.hyps])
        self.refs = refs
        self.errors = np.array([align(refs[u], h.words).errors for u in self.utts for h in nbest[u]])
        self.ref_words = np.array([len(refs[u]) for u in self.utts])

    def choose(self, lm: np.ndarray, lm_weight: float, penalty: float) -> np.ndarray:
        """Index of the best hypothesis of each utterance (ties: the earlier line)."""
        total = self.acoustic + lm_weight * lm + penalty * self.length
        best = np.maximum.reduceat(total, self.starts)
        hits = np.flatnonzero(total == np.repeat(best, self.sizes))
        segment = np.repeat(np.arange(len(self.utts)), self.sizes)[hits]
        return hits[np.unique(segment, return_index=True)[1]]

    def wer(self, chosen: np.ndarray, utts: np.ndarray) -> float:
        return self.errors[chosen[utts]].sum() / self.ref_words[utts].sum()


def sentence_scores(component, lists: Lists, lumped: int) -> np.ndarray:
    """Per-word ln P of every hypothesis (words and </s>), flattened in hypothesis order."""
    start = time.perf_counter()
    rows = []
    for i, h in enumerate(lists.hyps):
        rows.append(component.sentence_logprobs(h.words, lumped))
        if i % 50_000 == 0 and i:
            log(f"  {component.name}: {i:,} hypotheses, {sum(map(len, rows)) / (time.perf_counter() - start):,.0f} words/s")
    return np.concatenate(rows)


def rescoring_report(lists: Lists, per_word: dict[str, np.ndarray], grid) -> None:
    bounds = np.concatenate([[0], np.cumsum(lists.length + 1)[:-1]])
    half = len(lists.utts) // 2
    dev, evaluation = np.arange(half), np.arange(half, len(lists.utts))

    def sentence_lm(weights: dict[str, float]) -> np.ndarray:
        rows = np.vstack([per_word[n] for n in weights])
        mixed = np.logaddexp.reduce(rows + np.log(list(weights.values()))[:, None], axis=0)
        return np.add.reduceat(mixed, bounds)

    results = []
    oracle = np.array([s + int(np.argmin(lists.errors[s:s + n])) for s, n in zip(lists.starts, lists.sizes)])
    acoustic = lists.choose(np.zeros_like(lists.acoustic), 0.0, 0.0)
    results.append(("acoustic score only", lists.wer(acoustic, evaluation), acoustic, None))
    for label, weights in (("KN5", {"kn5": 1.0}), ("RNN", {"rnn": 1.0}), ("RNN + KN5 (0.75/0.25)", {"rnn": 0.75, "kn5": 0.25})):
        lm = sentence_lm(weights)
        tuned = min(grid, key=lambda g: lists.wer(lists.choose(lm, *g), dev))
        chosen = lists.choose(lm, *tuned)
        results.append((label, lists.wer(chosen, evaluation), chosen, tuned))
    results.append(("oracle (fewest errors in each list)", lists.wer(oracle, evaluation), oracle, None))

    print(f"\nN-best rescoring: {len(lists.utts):,} utterances, {len(lists.hyps):,} hypotheses; "
          f"LM weight and word penalty tuned on utterances 1-{half}, WER on {half + 1}-{len(lists.utts)}")
    evaluated = [lists.utts[i] for i in evaluation]
    for label, rate, chosen, tuned in results:
        hyps = {lists.utts[i]: list(lists.hyps[c].words) for i, c in enumerate(chosen)}
        split = wer({u: lists.refs[u] for u in evaluated}, {u: hyps[u] for u in evaluated})
        setting = "" if tuned is None else f"(λ={tuned[0]:g}, penalty={tuned[1]:g})"
        print(f"  {label:<38s} WER {100 * rate:5.2f} %  {split.substitutions:5d} sub {split.deletions:5d} del "
              f"{split.insertions:5d} ins / {split.ref_words:,} words  {setting}")
    kn, rnn_kn, orc = results[1][1], results[3][1], results[-1][1]
    print(f"  target WER(KN5) > WER(RNN+KN5) ≥ oracle: {100 * kn:.2f} > {100 * rnn_kn:.2f} ≥ {100 * orc:.2f}  "
          + ("PASS" if kn > rnn_kn >= orc else "FAIL"))


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/work/shared/data/ptb", help="folder with ptb.{train,valid,test}.txt")
    parser.add_argument("--main", default="runs/mix/ptb200.pt", help="the main RNN (H=200)")
    parser.add_argument("--extra", action="append", help="more RNNs for the mixture (default runs/mix/h300s3.pt, runs/mix/h400s4.pt)")
    parser.add_argument("--arpa", default="runs/mix/kn5.arpa", help="KN5 model (rnnlm ngram build)")
    parser.add_argument("--rate", type=float, default=0.01, help="dynamic learning rate")
    parser.add_argument("--bptt", type=int, default=1, help="extra BPTT steps in each dynamic update")
    parser.add_argument("--nbest", type=int, default=100, help="hypotheses per utterance")
    parser.add_argument("--nbest-seed", type=int, default=0)
    parser.add_argument("--nbest-sentences", type=int, default=0, help="use the first N test sentences (0: all)")
    parser.add_argument("--no-rescoring", action="store_true")
    args = parser.parse_args()
    data = Path(args.data)
    extras = args.extra or ["runs/mix/h300s3.pt", "runs/mix/h400s4.pt"]
    rule = OnlineRule(lr=args.rate, bptt=args.bptt)

    start = time.perf_counter()
    lm = read_arpa(args.arpa)
    log(f"read {args.arpa} ({time.perf_counter() - start:.1f} s)")
    kn = NGramComponent(lm, "kn5")
    models = {Path(p).stem: load_model(p) for p in [args.main, *extras]}
    for name, model in models.items():
        log(f"{name}: {model.describe()}")
    components = [kn]
    for name, model in models.items():
        components += [RNNComponent(model, f"{name}:static"), RNNComponent(model, f"{name}:dynamic", rule)]
    valid, test = read_tokens(data / "ptb.valid.txt"), read_tokens(data / "ptb.test.txt")
    table = Table(components, valid, test)
    main_name = Path(args.main).stem
    print(f"models: main {args.main}, extra {', '.join(extras)}; KN5 {args.arpa}; dynamic rule lr={args.rate}, bptt={args.bptt}")
    perplexity_report(table, main_name, [Path(p).stem for p in extras])
    sys.stdout.flush()
    if args.no_rescoring:
        return

    sentences = [line.split() for line in read_lines(data / "ptb.test.txt")]
    if args.nbest_sentences:
        sentences = sentences[: args.nbest_sentences]
    train_words = [w for line in read_lines(data / "ptb.train.txt") for w in line.split()]
    nbest, refs = generate_nbest(sentences, n=args.nbest, seed=args.nbest_seed, vocabulary=train_words)
    lists = Lists(nbest, refs)
    log(f"generated and aligned {len(lists.hyps):,} hypotheses")
    pair = Mixture([RNNComponent(models[main_name], "rnn"), NGramComponent(lm, "kn5")])
    per_word = {c.name: sentence_scores(c, lists, n) for c, n in zip(pair.components, pair.lumped)}
    grid = [(w, p) for w in np.arange(0.25, 3.01, 0.25) for p in np.arange(-2.0, 20.01, 1.0)]
    rescoring_report(lists, per_word, grid)
    log("done")


if __name__ == "__main__":
    main()
