"""`rnnlm eval --ngram` gives both countings: every token (the literal `<unk>` and OOVs scored as
`<unk>`), and KenLM's "perplexity excluding OOVs" (those tokens left out)."""

import json
import subprocess
import sys

import pytest

# A bigram model small enough to score by hand (log10 probabilities and backoffs).
ARPA = """\\data\\
ngram 1=5
ngram 2=3

\\1-grams:
-1.0\t<unk>
-99\t<s>\t-0.5
-0.5\t</s>
-0.6\ta\t-0.3
-0.7\tb\t-0.2

\\2-grams:
-0.2\t<s> a
-0.3\ta b
-0.1\tb </s>

\\end\\
"""


def test_eval_ngram_reports_perplexity_excluding_unk_as_kenlm(tmp_path):
    (tmp_path / "lm.arpa").write_text(ARPA)
    (tmp_path / "test.txt").write_text("a b\na <unk> zzz b\n")
    r = subprocess.run([sys.executable, "-m", "rnnlm.cli", "eval", "--ngram", str(tmp_path / "lm.arpa"),
                        "--test", str(tmp_path / "test.txt"), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    # a b </s>: -0.2 -0.3 -0.1.  a <unk> zzz b </s>: -0.2, then <unk> after a backs off
    # (-0.3 + -1.0), zzz is <unk> after <unk> (-1.0), b after <unk> backs off (0 + -0.7), -0.1.
    every = [-0.2, -0.3, -0.1, -0.2, -1.3, -1.0, -0.7, -0.1]
    known = [-0.2, -0.3, -0.1, -0.2, -0.7, -0.1]
    assert result["words"] == 8 and result["oov"] == 1  # zzz; the literal <unk> is a word of the model
    assert result["perplexity"] == pytest.approx(10 ** (-sum(every) / 8), rel=1e-9)
    assert result["excluding_unk"]["words"] == 6 and result["excluding_unk"]["excluded"] == 2
    assert result["excluding_unk"]["perplexity"] == pytest.approx(10 ** (-sum(known) / 6), rel=1e-9)
    text = subprocess.run([sys.executable, "-m", "rnnlm.cli", "eval", "--ngram", str(tmp_path / "lm.arpa"),
                           "--test", str(tmp_path / "test.txt")], capture_output=True, text=True, timeout=120)
    assert f"excluding <unk> and OOV tokens (as KenLM's 'perplexity excluding OOVs'): perplexity " \
           f"{10 ** (-sum(known) / 6):.2f}" in text.stdout, text.stdout
