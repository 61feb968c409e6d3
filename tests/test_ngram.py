"""Backoff n-gram models: ARPA reading/writing, scoring, and modified Kneser–Ney estimation.

Expected probabilities are worked out by hand from the formulas of Chen & Goodman (1998) in the
comments, not produced by the code under test.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from click.testing import CliRunner

from rnnlm.ngram import LN10, build_kneser_ney, read_arpa, score_corpus, write_arpa
from rnnlm.ngram_cli import ngram_group

# --------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------


def random_corpus(seed: int, sentences: int = 400, vocab: int = 25) -> list[list[str]]:
    """Sentences from a small bigram-ish process, so that n-grams of all orders repeat."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    out = []
    for _ in range(sentences):
        length = rng.randint(0, 9)
        sentence = [rng.choice(words[:8])]
        while len(sentence) < length:
            # Mostly a word close to the previous one: gives frequent and rare n-grams alike.
            prev = int(sentence[-1][1:])
            nxt = (prev + rng.choice([1, 1, 2, 3, rng.randrange(vocab)])) % vocab
            sentence.append(words[nxt])
        if rng.random() < 0.1:
            sentence.insert(rng.randrange(len(sentence) + 1), "<unk>")
        out.append(sentence[:length])
    return out


def total_probability(lm, history) -> float:
    """Σ_w P(w | history) over every word the model can predict (all but <s>)."""
    return math.fsum(math.exp(lm.logprob(w, history)) for w in lm.vocab if w != "<s>")


TOY = [["a", "b"], ["a", "b"], ["b", "a"]]
# Text with <s> and </s>:  <s> a b </s> | <s> a b </s> | <s> b a </s>


# --------------------------------------------------------------------------------------------
# Kneser–Ney estimation, checked by hand
# --------------------------------------------------------------------------------------------


def test_kneser_ney_trigram_matches_hand_computation():
    # Fixed discounts (D1, D2, D3+) per order so the arithmetic stays readable.
    lm = build_kneser_ney(TOY, order=3, discounts=[(0.5, 1.0, 1.5), (0.5, 1.0, 1.5), (0.25, 0.5, 0.75)])
    p = lambda w, *h: math.exp(lm.logprob(w, h))  # noqa: E731

    # Unigrams: adjusted count = number of distinct left neighbours (continuation count).
    #   a: {<s>, b} -> 2     b: {a, <s>} -> 2     </s>: {b, a} -> 2     <s>: 0     <unk>: 0
    # Σ a = 6; every count is 2, so D(2) = 1.0 each: γ = 3 * 1.0 / 6 = 1/2.
    # |V| = {<unk>, </s>, a, b} = 4 (<s> excluded):  p(a) = (2 - 1)/6 + (1/2)(1/4) = 7/24.
    assert p("a") == pytest.approx(7 / 24)
    assert p("</s>") == pytest.approx(7 / 24)
    assert p("<unk>") == pytest.approx(1 / 8)  # <unk> never seen: only its share of γ/|V|
    assert p("never-seen") == pytest.approx(1 / 8)  # unknown words are scored as <unk>

    # Bigrams (lower order of a trigram model): continuation counts, except that n-grams
    # starting with <s> keep their raw counts.
    #   <s> a: raw 2     <s> b: raw 1     a b: {<s>} -> 1 (raw count is 2!)     b a: 1   ...
    # History <s>: a(2), b(1): Σ = 3, γ = (D2 + D1)/3 = 1.5/3 = 1/2.
    #   p(a | <s>) = (2 - 1)/3 + (1/2)(7/24) = 23/48;  p(b | <s>) = (1 - 0.5)/3 + 7/48 = 15/48.
    assert p("a", "<s>") == pytest.approx(23 / 48)
    assert p("b", "<s>") == pytest.approx(15 / 48)
    # History a: b(1), </s>(1): Σ = 2, γ = (0.5 + 0.5)/2 = 1/2;  p(b | a) = 0.5/2 + 7/48 = 19/48.
    assert p("b", "a") == pytest.approx(19 / 48)
    # Unseen bigram: bow(<s>) * p(</s>) = (1/2)(7/24).
    assert p("</s>", "<s>") == pytest.approx(7 / 48)

    # Trigrams (highest order: raw counts), discounts (0.25, 0.5, 0.75).
    # History "<s> a": b(2): Σ = 2, γ = 0.5/2 = 1/4;  p(b | <s> a) = (2 - 0.5)/2 + (1/4)(19/48) = 163/192.
    assert p("b", "<s>", "a") == pytest.approx(163 / 192)
    # Backing off one level: bow(<s> a) * p(</s> | a) = (1/4)(19/48).
    assert p("</s>", "<s>", "a") == pytest.approx(19 / 192)
    # Two levels ("<s> a a" and "a a" unseen): bow(<s> a) * bow(a) * p(a) = (1/4)(1/2)(7/24).
    assert p("a", "<s>", "a") == pytest.approx(7 / 192)
    # A history the model never saw backs off entirely: p(b | x a) = p(b | a).
    assert p("b", "x", "a") == pytest.approx(19 / 48)

    # A sentence: P(a | <s>) P(b | <s> a) P(</s> | a b), with P(</s> | a b) = 0.75 + (1/4)(19/48).
    expected = [23 / 48, 163 / 192, 163 / 192]
    assert lm.sentence_logprobs(["a", "b"]) == pytest.approx([math.log(x) for x in expected])


def test_kneser_ney_discounts_from_count_of_counts():
    # A unigram model: its (highest-order) adjusted counts are raw counts, so n_1..n_4 are easy.
    words = ["u1", "u2", "u3", "u4"] + ["t1", "t2"] * 2 + ["h1", "h2"] * 3 + ["f1"] * 4
    lm = build_kneser_ney([words], order=1)
    # Counts: u1..u4 and </s> once (n1 = 5), t1 t2 twice (n2 = 2), h1 h2 thrice (n3 = 2), f1 4x (n4 = 1).
    # Y = 5/(5 + 2*2) = 5/9;  D1 = 1 - 2Y(2/5) = 5/9;  D2 = 2 - 3Y(2/2) = 1/3;  D3+ = 3 - 4Y(1/2) = 17/9.
    assert lm.discounts[0] == pytest.approx((5 / 9, 1 / 3, 17 / 9))
    # Σ counts = 19;  γ = (5 D1 + 2 D2 + 3 D3+)/19 = (82/9)/19 = 82/171;  |V| = 9 words + </s> + <unk> = 11.
    gamma, size = 82 / 171, 11
    assert math.exp(lm.logprob("u1")) == pytest.approx((1 - 5 / 9) / 19 + gamma / size)
    assert math.exp(lm.logprob("f1")) == pytest.approx((4 - 17 / 9) / 19 + gamma / size)
    assert math.exp(lm.logprob("<unk>")) == pytest.approx(gamma / size)


def test_kneser_ney_probabilities_sum_to_one():
    lm = build_kneser_ney(random_corpus(1), order=4)
    seen = [("<s>",), ("<s>", "w1"), ("w1", "w2"), ("w2", "w3", "w4"), ("<s>", "w0", "w1")]
    unseen = [("w24", "w0", "w24"), ("w3", "<unk>"), ("nonsense",), ("w5", "nonsense", "w6"), ()]
    for history in seen + unseen:
        assert total_probability(lm, history) == pytest.approx(1.0, abs=1e-9), history
    # The seen histories really are stored in the model (so both code paths are exercised).
    assert lm.logprob("w2", ("w1",)) != lm.logprob("w2", ())


def test_kneser_ney_unk_in_text_is_an_ordinary_word():
    lm = build_kneser_ney([["a", "<unk>", "b"], ["<unk>", "b"]] * 3, order=2)
    # "<unk> b" was seen; its probability comes from the bigram, above the unigram share.
    assert lm.logprob("b", ("<unk>",)) > lm.logprob("b", ())
    assert lm.logprob("zzz", ("a",)) == lm.logprob("<unk>", ("a",))


def test_kneser_ney_rejects_sentence_markers_in_text():
    with pytest.raises(ValueError, match="contains </s>"):
        build_kneser_ney([["a", "</s>", "b"]], order=2)


# --------------------------------------------------------------------------------------------
# ARPA files
# --------------------------------------------------------------------------------------------


def test_arpa_round_trip_is_exact(tmp_path):
    lm = build_kneser_ney(random_corpus(2), order=3)
    path = tmp_path / "lm.arpa"
    write_arpa(lm, path)
    back = read_arpa(path)
    assert back.vocab == lm.vocab and back.counts == lm.counts
    for mine, theirs in zip(lm.tables, back.tables):
        assert np.array_equal(mine.ids, theirs.ids)
        assert np.array_equal(mine.logprob10, theirs.logprob10)
        assert np.array_equal(mine.backoff10, theirs.backoff10)
    for sentence in random_corpus(3, sentences=30) + [["nonsense", "w1"]]:
        assert back.sentence_logprobs(sentence) == lm.sentence_logprobs(sentence)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


SRILM_STYLE = """
This text before \\data\\ is ignored, as the ARPA format allows.
\\data\\
ngram 1=5
ngram  2=3

\\1-grams:
-0.69897\t</s>
-99\t<s>\t-0.30103
-0.69897 a\t-0.1
-0.39794\tb -0.2
-1.0\t<unk>

\\2-grams:
-0.30103\t<s> a
-0.5\ta b
-0.2   b  </s>

\\end\\
"""


def test_read_hand_written_srilm_style_arpa(tmp_path):
    path = tmp_path / "small.arpa"
    path.write_text(SRILM_STYLE)
    lm = read_arpa(path)
    assert lm.order == 2 and lm.counts == [5, 3]
    assert lm.is_known("a") and lm.is_known("<unk>") and not lm.is_known("zzz")
    # A stored bigram: its own probability.
    assert lm.logprob("a", ("<s>",)) == pytest.approx(-0.30103 * LN10)
    # Unseen bigram "a </s>": bow(a) + log p(</s>) in log10, i.e. -0.1 - 0.69897.
    assert lm.logprob("</s>", ("a",)) == pytest.approx((-0.1 - 0.69897) * LN10)
    # History without a backoff column (b </s> is not a history): bow = 1.
    assert lm.logprob("a", ("</s>",)) == pytest.approx(-0.69897 * LN10)
    # Unknown word: scored as <unk>, after backing off from <s> (bow -0.30103).
    assert lm.logprob("zzz", ("<s>",)) == pytest.approx((-0.30103 - 1.0) * LN10)
    # <s> is never predicted.
    assert lm.logprob("<s>") == pytest.approx(-99 * LN10)
    assert lm.sentence_logprobs(["a", "b"]) == pytest.approx(
        [-0.30103 * LN10, -0.5 * LN10, -0.2 * LN10]
    )


def test_model_without_unk_gives_oov_zero_probability(tmp_path):
    path = tmp_path / "closed.arpa"
    path.write_text(SRILM_STYLE.replace("ngram 1=5", "ngram 1=4").replace("-1.0\t<unk>\n", ""))
    lm = read_arpa(path)
    assert lm.logprob("zzz", ("a",)) == -math.inf
    # The word after an OOV backs off past it.
    assert lm.sentence_logprobs(["zzz", "b"])[1] == pytest.approx(-0.39794 * LN10)
    result = score_corpus(lm, [["a", "zzz", "b"]])
    assert result.oov == 1 and result.words == 3  # a, b, </s>; zzz left out and counted


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("\\data\\\n", ""), "no \\\\data\\\\ line"),
        (lambda t: t.replace("ngram  2=3", "ngram 2=4"), "declares 4 2-grams but the section has 3"),
        (lambda t: t.replace("ngram  2=3", "ngram 2=x"), "bad count line"),
        (lambda t: t.replace("-0.5\ta b", "-0.5\ta b c d"), ":16: a 2-gram line needs 3 fields"),
        (lambda t: t.replace("-0.5\ta b", "-0.5\ta zz"), "word 'zz' is not among the unigrams"),
        (lambda t: t.replace("-0.5\ta b", "oops\ta b"), "log10 probability 'oops' is not a number"),
        (lambda t: t.replace("-0.5\ta b", "0.5\ta b"), "log10 probability 0.5 is positive"),
        (lambda t: t.replace("\tb -0.2", "\tb nan"), "backoff weight 'nan' is not a usable number"),
        (lambda t: t.replace("-1.0\t<unk>", "-1.0\ta"), "unigram 'a' is listed twice"),
        (lambda t: t.replace("\\end\\\n", ""), "expected \\\\end\\\\"),
        (lambda t: t.replace("\\2-grams:", "\\3-grams:"), "expected the \\\\2-grams: section"),
        (lambda t: t.replace("</s>", "</S>"), "no </s> unigram"),
    ],
)
def test_malformed_arpa_is_a_clear_value_error(tmp_path, edit, message):
    path = tmp_path / "bad.arpa"
    path.write_text(edit(SRILM_STYLE))
    with pytest.raises(ValueError, match=message):
        read_arpa(path)


def test_non_utf8_arpa(tmp_path):
    path = tmp_path / "latin1.arpa"
    path.write_bytes(SRILM_STYLE.replace("a b", "a b").encode() + b"\xff")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_arpa(path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_cli_build_and_score(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(" ".join(s) for s in random_corpus(4)) + "\n")
    test = tmp_path / "test.txt"
    test.write_text(" w1 w2 w3 \n w0 zzz \n")
    arpa = tmp_path / "kn3.arpa"
    runner = CliRunner()
    built = runner.invoke(ngram_group, ["build", "--order", "3", "--train", str(train), "--out", str(arpa)])
    assert built.exit_code == 0, built.output
    scored = runner.invoke(ngram_group, ["score", "--arpa", str(arpa), "--test", str(test), "--json"])
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout.strip().splitlines()[-1])
    assert report["words"] == 7 and report["oov"] == 1  # 5 words + 2 </s>; zzz scored as <unk>
    lm = read_arpa(arpa)
    total = sum(lm.sentence_logprob(s) for s in (["w1", "w2", "w3"], ["w0", "zzz"]))
    assert report["perplexity"] == pytest.approx(math.exp(-total / 7))
    assert report["entropy_bits"] == pytest.approx(-total / 7 / math.log(2))


@pytest.mark.parametrize("content", [None, b"", b"\xff\xfe not utf-8\n"])
def test_cli_bad_training_file_is_one_line_error(tmp_path, content):
    train = tmp_path / "train.txt"
    if content is not None:
        train.write_bytes(content)
    result = CliRunner().invoke(ngram_group, ["build", "--train", str(train), "--out", str(tmp_path / "x.arpa")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_scoring_entry_points_agree():
    lm = build_kneser_ney(random_corpus(5), order=5)
    sentences = random_corpus(6, sentences=40) + [["zzz", "w1", "w2"], []]
    stream = [w for s in sentences for w in s + ["</s>"]]
    by_sentence = [lp for s in sentences for lp in lm.sentence_logprobs(s)]
    assert list(lm.stream_logprobs(stream)) == by_sentence
    for s in sentences:
        history = ["<s>"]
        for word, expected in zip(s + ["</s>"], lm.sentence_logprobs(s)):
            # Any history length works: shorter than the order, or longer (only the last 4 count).
            assert lm.logprob(word, tuple(history)) == expected
            if len(history) >= 4:
                assert lm.logprob(word, ("w9", "w9", "w9") + tuple(history)) == expected
            history.append(word)
    assert lm.sentence_logprob(sentences[0]) == pytest.approx(sum(lm.sentence_logprobs(sentences[0])))
