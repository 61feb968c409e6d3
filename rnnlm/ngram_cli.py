"""Command-line tools for the n-gram side: build and score KN models, make n-best lists, WER.

`ngram_group` is a click group meant to be added to the main `rnnlm` command
(`main.add_command(ngram_group)`), giving:

    rnnlm ngram build --order 5 --train ptb.train.txt --out kn5.arpa
    rnnlm ngram score --arpa kn5.arpa --test ptb.test.txt [--json]
    rnnlm ngram nbest-generate --text ptb.test.txt --out nbest.txt --refs refs.txt --n 100 --seed 0
    rnnlm ngram wer --refs refs.txt --hyps onebest.txt [--json]

`nbest_generate` and `wer_command` are also importable on their own, should they be wanted as
top-level commands. Text files are read with `rnnlm.corpus` (one sentence a line, blank lines
skipped), the same way the RNN side reads them, so word counts agree. Every error a user can
cause ends as one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import time

import click

from .cli_errors import friendly_errors, say
from .corpus import read_lines
from .nbest import generate_nbest, lm_scores, read_texts, wer, write_nbest, write_texts
from .ngram import build_kneser_ney, read_arpa, score_corpus, write_arpa


def _sentences(path: str) -> list[list[str]]:
    return [line.split() for line in read_lines(path)]


@click.group("ngram")
def ngram_group() -> None:
    """Backoff n-gram models (ARPA), n-best lists and word error rate."""


@ngram_group.command("build", short_help="Build a modified Kneser–Ney model and write it as ARPA.")
@click.option("--train", "train_path", required=True, metavar="FILE", help="Training text, one sentence a line.")
@click.option("--out", "out_path", required=True, metavar="FILE", help="ARPA file to write.")
@click.option("--order", default=5, show_default=True, type=click.IntRange(1, 10), help="N-gram order.")
@friendly_errors
def build(train_path: str, out_path: str, order: int) -> None:
    """Estimate an interpolated modified Kneser–Ney model (as KenLM lmplz) and write it as ARPA."""
    start = time.perf_counter()
    sentences = _sentences(train_path)
    say(f"read {train_path}: {len(sentences):,} sentences ({time.perf_counter() - start:.1f} s)")
    lm = build_kneser_ney(sentences, order=order, log=say)
    del sentences
    written = time.perf_counter()
    write_arpa(lm, out_path)
    say(f"wrote {out_path} ({', '.join(f'{n}-grams {c:,}' for n, c in enumerate(lm.counts, 1))}) "
         f"in {time.perf_counter() - written:.1f} s; total {time.perf_counter() - start:.1f} s")


@ngram_group.command("score", short_help="Perplexity of a text under an ARPA model.")
@click.option("--arpa", "arpa_path", required=True, metavar="FILE", help="ARPA backoff model (SRILM, KenLM or ours).")
@click.option("--test", "test_path", required=True, metavar="FILE", help="Text to score, one sentence a line.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@friendly_errors
def score(arpa_path: str, test_path: str, as_json: bool) -> None:
    """Perplexity of a text under an ARPA model (`</s>` counted as a word, as Mikolov's toolkit).

    OOVs (words outside the model's vocabulary) are scored as <unk> when the model has it, and
    left out of the perplexity otherwise; either way they are counted.
    """
    start = time.perf_counter()
    lm = read_arpa(arpa_path)
    say(f"loaded {arpa_path}: order {lm.order}, {sum(lm.counts):,} n-grams ({time.perf_counter() - start:.1f} s)")
    result = score_corpus(lm, _sentences(test_path))
    report = {
        "perplexity": result.perplexity,
        "entropy_bits": result.entropy_bits,
        "words": result.words,
        "oov": result.oov,
        "sentences": result.sentences,
        "logprob": result.logprob,
        "words_per_sec": result.words_per_sec,
    }
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(f"{test_path}: {result.sentences:,} sentences, {result.words:,} words (</s> included), {result.oov:,} OOVs")
        click.echo(f"logprob {result.logprob:.2f} (ln)  perplexity {result.perplexity:.2f}  "
                   f"entropy {result.entropy_bits:.4f} bits/word  ({result.words_per_sec:,.0f} words/s)")


@ngram_group.command("nbest-generate", short_help="Make synthetic n-best lists from reference text.")
@click.option("--text", "text_path", required=True, metavar="FILE", help="Reference sentences, one a line.")
@click.option("--out", "out_path", required=True, metavar="FILE", help="N-best file to write.")
@click.option("--refs", "refs_path", required=True, metavar="FILE", help="Reference file to write.")
@click.option("--n", "n", default=100, show_default=True, type=click.IntRange(1), help="Hypotheses per utterance (at most).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same lists).")
@click.option("--vocab-text", metavar="FILE", help="Text whose words are the confusions (e.g. the training text); default --text.")
@click.option("--error-rate", default=0.2, show_default=True, type=click.FloatRange(0, 1), help="Mean word corruption rate.")
@click.option("--arpa", "arpa_path", metavar="FILE", help="Fill the lm_score column with this ARPA model (else 0).")
@friendly_errors
def nbest_generate(text_path, out_path, refs_path, n, seed, vocab_text, error_rate, arpa_path) -> None:
    """Make synthetic recogniser n-best lists from reference text (see rnnlm.nbest.generate_nbest)."""
    start = time.perf_counter()
    sentences = _sentences(text_path)
    vocabulary = [w for s in _sentences(vocab_text) for w in s] if vocab_text else None
    nbest, refs = generate_nbest(sentences, n=n, seed=seed, vocabulary=vocabulary, error_rate=error_rate)
    if arpa_path:
        nbest = lm_scores(nbest, read_arpa(arpa_path).sentence_logprob)
    write_nbest(nbest, out_path)
    write_texts(refs, refs_path)
    total = sum(len(h) for h in nbest.values())
    say(f"wrote {out_path} ({len(nbest):,} utterances, {total:,} hypotheses) and {refs_path} "
         f"in {time.perf_counter() - start:.1f} s")


@ngram_group.command("wer", short_help="Word error rate of 1-best hypotheses against references.")
@click.option("--refs", "refs_path", required=True, metavar="FILE", help="References: 'utt_id words...' per line.")
@click.option("--hyps", "hyps_path", required=True, metavar="FILE", help="1-best hypotheses, same format.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@friendly_errors
def wer_command(refs_path: str, hyps_path: str, as_json: bool) -> None:
    """Word error rate of 1-best hypotheses against references (Levenshtein alignment)."""
    result = wer(read_texts(refs_path), read_texts(hyps_path))
    if as_json:
        click.echo(json.dumps({
            "wer": result.wer, "errors": result.errors, "substitutions": result.substitutions,
            "deletions": result.deletions, "insertions": result.insertions, "ref_words": result.ref_words,
            "sentences": result.sentences, "sentence_errors": result.sentence_errors,
        }))
    else:
        click.echo(result.summary())


if __name__ == "__main__":  # python -m rnnlm.ngram_cli ...
    ngram_group(prog_name="rnnlm ngram")
