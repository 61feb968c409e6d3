"""Benchmark: modified Kneser–Ney 5-gram on the Penn Treebank against KenLM's lmplz.

    .venv/bin/python bench/bench_ngram.py [--data /work/shared/data/ptb] [--order 5] [--keep kn5.arpa]

Builds the model on ptb.train.txt, writes it as ARPA, reads it back, and scores ptb.test.txt
(`</s>` counted as a word). Reference numbers for KenLM `lmplz -o 5` on this machine (2 cores),
from DESIGN.md: test perplexity 141.19, 2.3 s, 418 MB.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from rnnlm.ngram import build_kneser_ney, read_arpa, score_corpus, write_arpa  # noqa: E402

KENLM = {"perplexity": 141.19, "seconds": 2.3, "rss_mb": 418.0}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sentences(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/work/shared/data/ptb", help="folder with ptb.{train,test}.txt")
    parser.add_argument("--order", type=int, default=5)
    parser.add_argument("--keep", metavar="ARPA", help="also keep the ARPA file here")
    args = parser.parse_args()
    data = Path(args.data)
    train, test = data / "ptb.train.txt", data / "ptb.test.txt"

    start = time.perf_counter()
    lm = build_kneser_ney(sentences(train), order=args.order)
    build_s = time.perf_counter() - start
    build_rss = peak_rss_mb()

    with tempfile.TemporaryDirectory() as tmp:
        arpa = Path(args.keep) if args.keep else Path(tmp) / f"kn{args.order}.arpa"
        start = time.perf_counter()
        write_arpa(lm, arpa)
        write_s = time.perf_counter() - start
        arpa_mb = arpa.stat().st_size / 2**20

        result = score_corpus(lm, sentences(test))

        del lm  # reading back is a separate job: measure it alone
        start = time.perf_counter()
        again = read_arpa(arpa)
        read_s = time.perf_counter() - start
        reread = score_corpus(again, sentences(test))

    print(f"KN{args.order} on {train}")
    print(f"  n-grams:          {', '.join(f'{n}={c:,}' for n, c in enumerate(again.counts, 1))}")
    print(f"  build:            {build_s:6.2f} s   (count, adjust, discount, interpolate, index for scoring)")
    print(f"  peak RSS:         {build_rss:6.0f} MB after build; {peak_rss_mb():.0f} MB at the end")
    print(f"  ARPA write:       {write_s:6.2f} s   ({arpa_mb:.0f} MB)")
    print(f"  ARPA read:        {read_s:6.2f} s")
    print(f"  test:             {result.words:,} tokens (</s> included), {result.oov} OOVs, {result.sentences:,} sentences")
    print(f"  test perplexity:  {result.perplexity:.3f}  (re-read model: {reread.perplexity:.3f})")
    print(f"  scoring speed:    {result.words_per_sec:,.0f} words/s")
    print("vs KenLM lmplz -o 5 (141.19, 2.3 s, 418 MB):")
    print(f"  perplexity ratio: {result.perplexity / KENLM['perplexity']:.5f}")
    print(f"  time ratio:       {build_s / KENLM['seconds']:.2f}x build, {(build_s + write_s) / KENLM['seconds']:.2f}x build + ARPA write")
    print(f"  memory ratio:     {build_rss / KENLM['rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
