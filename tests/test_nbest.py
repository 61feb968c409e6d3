"""N-best lists: file formats, alignment and WER, rescoring, and the synthetic generator."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rnnlm.nbest import (
    Hypothesis,
    align,
    generate_nbest,
    one_best,
    oracle,
    read_nbest,
    read_texts,
    rescore,
    wer,
    write_nbest,
    write_texts,
)
from rnnlm.ngram import build_kneser_ney
from rnnlm.ngram_cli import ngram_group


# --------------------------------------------------------------------------------------------
# Alignment and WER
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, hyp, subs, dels, ins",
    [
        ("a b c", "a b c", 0, 0, 0),
        ("a b c", "a x c", 1, 0, 0),
        ("a b c", "a c", 0, 1, 0),
        ("a b", "a b c", 0, 0, 1),
        ("", "a b", 0, 0, 2),
        ("a b", "", 0, 2, 0),
        ("a b", "c d", 2, 0, 0),  # two substitutions, not 2 deletions + 2 insertions
        ("a b c d", "b c d e", 0, 1, 1),  # shift: cheaper than 4 substitutions
        ("the cat sat on the mat", "the cat sat on mat", 0, 1, 0),
        ("the cat sat on the mat", "a cat sat in the the mat", 2, 0, 1),
        ("a a a", "a a", 0, 1, 0),
    ],
)
def test_align_counts(ref, hyp, subs, dels, ins):
    a = align(ref.split(), hyp.split())
    assert (a.substitutions, a.deletions, a.insertions) == (subs, dels, ins)
    assert a.ref_length == len(ref.split())
    assert a.errors == subs + dels + ins


def test_wer_is_aggregated_over_the_corpus():
    refs = {"u1": "a b c d".split(), "u2": "e f".split(), "u3": "g".split()}
    hyps = {"u1": "a x c d".split(), "u2": "e f f".split(), "u3": []}
    result = wer(refs, hyps)
    # u1: 1 sub; u2: 1 ins; u3: 1 del -> 3 errors over 7 reference words, 3 of 3 sentences wrong.
    assert (result.substitutions, result.deletions, result.insertions) == (1, 1, 1)
    assert result.ref_words == 7 and result.wer == pytest.approx(3 / 7)
    assert result.sentence_errors == 3
    assert result.summary().startswith("%WER 42.86 [ 3 / 7, 1 ins, 1 del, 1 sub ]")


def test_wer_refuses_mismatched_utterances():
    with pytest.raises(ValueError, match="no hypothesis"):
        wer({"u1": ["a"], "u2": ["b"]}, {"u1": ["a"]})
    with pytest.raises(ValueError, match="no reference"):
        wer({"u1": ["a"]}, {"u1": ["a"], "u9": ["b"]})


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_nbest_and_reference_files_round_trip(tmp_path):
    nbest = {
        "utt1": [Hypothesis(("the", "cat"), -10.5, -7.25), Hypothesis(("a", "cat"), -11.0, -8.0)],
        "utt2": [Hypothesis((), -3.0, 0.0)],  # an empty hypothesis is allowed
    }
    write_nbest(nbest, tmp_path / "nbest.txt")
    assert read_nbest(tmp_path / "nbest.txt") == nbest
    refs = {"utt1": ["the", "cat"], "utt2": []}
    write_texts(refs, tmp_path / "refs.txt")
    assert read_texts(tmp_path / "refs.txt") == refs


def test_read_nbest_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "nbest.txt"
    path.write_text("# utt ac lm words\n\nu1 -1.5 -2 hello world\nu1\t-2.5\t-1\thello\n")
    assert read_nbest(path) == {"u1": [Hypothesis(("hello", "world"), -1.5, -2.0), Hypothesis(("hello",), -2.5, -1.0)]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("u1 -1.0\n", ":1: expected 'utt_id acoustic_score lm_score words...'"),
        ("u1 -1.0 abc w\n", ":1: scores '-1.0' 'abc' are not numbers"),
        ("u1 -1 0 a\nu2 -1 0 b\nu1 -2 0 c\n", ":3: hypotheses of 'u1' are not on consecutive lines"),
        ("u1 nan 0 a\n", "must be finite"),
        ("", "no hypotheses"),
    ],
)
def test_malformed_nbest_files(tmp_path, text, message):
    path = tmp_path / "nbest.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_nbest(path)


def test_reference_file_with_repeated_utterance(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("u1 a b\nu1 c\n")
    with pytest.raises(ValueError, match=":2: utterance 'u1' appears twice"):
        read_texts(path)


# --------------------------------------------------------------------------------------------
# Rescoring
# --------------------------------------------------------------------------------------------


def test_rescoring_follows_the_language_model_as_its_weight_grows():
    lm = build_kneser_ney([["the", "cat", "sat", "on", "the", "mat"], ["the", "cat", "sat"], ["a", "dog", "sat"]] * 4, order=3)
    good, bad = ("the", "cat", "sat"), ("the", "cat", "mat")
    assert lm.sentence_logprob(list(good)) > lm.sentence_logprob(list(bad)) + 1.0
    # The acoustics prefer the wrong one by a little.
    nbest = {"u1": [Hypothesis(bad, -100.0), Hypothesis(good, -100.5)]}
    assert rescore(nbest, lm.sentence_logprob, lm_weight=0.0)["u1"].words == bad
    chosen = rescore(nbest, lm.sentence_logprob, lm_weight=5.0)["u1"]
    assert chosen.words == good
    assert chosen.lm == pytest.approx(lm.sentence_logprob(list(good)))  # the score it used


def test_rescoring_word_penalty_and_stored_lm_scores():
    nbest = {"u1": [Hypothesis(("a",), -10.0, -2.0), Hypothesis(("a", "b"), -10.0, -3.0)]}
    # No scorer: the file's lm column. Shorter hypothesis has the better LM score...
    assert rescore(nbest, None, lm_weight=1.0)["u1"].words == ("a",)
    # ...until a per-word bonus outweighs the 1 nat: -12 + 0 vs -13 + 1.5.
    assert rescore(nbest, None, lm_weight=1.0, word_penalty=1.5)["u1"].words == ("a", "b")
    # A scorer is any callable: here one that counts letters.
    assert rescore(nbest, lambda words: -float(len(words)), lm_weight=1.0)["u1"].words == ("a",)


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


SENTENCES = [
    "the market fell sharply on friday".split(),
    "shares of the company rose in late trading".split(),
    "he said the sale was n't expected".split(),
    "ok".split(),
]
VOCABULARY = " ".join(" ".join(s) for s in SENTENCES).split() + "sell sale cell sales falls fell bell tell rise rises the a an".split()


def test_generator_is_deterministic_for_a_seed():
    first = generate_nbest(SENTENCES, n=20, seed=7, vocabulary=VOCABULARY)
    again = generate_nbest(SENTENCES, n=20, seed=7, vocabulary=VOCABULARY)
    other = generate_nbest(SENTENCES, n=20, seed=8, vocabulary=VOCABULARY)
    assert first == again
    assert first[0] != other[0]
    # A list does not depend on the other sentences.
    alone = generate_nbest(SENTENCES[:2], n=20, seed=7, vocabulary=VOCABULARY)
    assert alone[0]["utt000002"] == first[0]["utt000002"]


def test_generated_lists_look_like_recogniser_output():
    nbest, refs = generate_nbest(SENTENCES * 10, n=30, seed=0, vocabulary=VOCABULARY, ref_prob=0.5)
    assert list(refs.values()) == [list(s) for s in SENTENCES * 10]
    contains_ref = 0
    for utt, hyps in nbest.items():
        words = [h.words for h in hyps]
        assert 1 <= len(hyps) <= 30 and len(set(words)) == len(words)  # distinct hypotheses
        scores = [h.acoustic for h in hyps]
        assert scores == sorted(scores, reverse=True)  # best first
        contains_ref += tuple(refs[utt]) in words
        for h in hyps:
            assert set(h.words) <= set(VOCABULARY)
    assert 10 <= contains_ref <= 30  # reference present in about half of the 40 lists
    # Acoustic scores favour fewer errors: acoustic-only 1-best beats a random pick, and the
    # oracle is better still.
    acoustic = wer(refs, one_best(rescore(nbest, None, lm_weight=0.0))).wer
    worst_first = wer(refs, {u: list(h[-1].words) for u, h in nbest.items()}).wer
    best_possible = wer(refs, one_best(oracle(nbest, refs))).wer
    assert best_possible < acoustic < worst_first


def test_cli_generate_then_wer(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(s) for s in SENTENCES) + "\n")
    out, refs = tmp_path / "nbest.txt", tmp_path / "refs.txt"
    runner = CliRunner()
    made = runner.invoke(ngram_group, ["nbest-generate", "--text", str(text), "--out", str(out),
                                       "--refs", str(refs), "--n", "10", "--seed", "3"])
    assert made.exit_code == 0, made.output
    nbest = read_nbest(out)
    assert len(nbest) == len(SENTENCES)
    hyps = tmp_path / "hyps.txt"
    write_texts({u: list(h[0].words) for u, h in nbest.items()}, hyps)
    scored = runner.invoke(ngram_group, ["wer", "--refs", str(refs), "--hyps", str(hyps), "--json"])
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout)
    expected = wer(read_texts(refs), read_texts(hyps))
    assert report["wer"] == pytest.approx(expected.wer) and report["ref_words"] == 22
    missing = runner.invoke(ngram_group, ["wer", "--refs", str(refs), "--hyps", str(tmp_path / "none.txt")])
    assert missing.exit_code == 1 and missing.output.startswith("Error: ") and "Traceback" not in missing.output
