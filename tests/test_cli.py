"""The `rnnlm` command run as a user runs it: a real process, real files, exit codes and messages."""

import json
import subprocess
import sys

import pytest

from tests.test_model import toy_text


def rnnlm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rnnlm.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = toy_text(400)
    (d / "train.txt").write_text("\n".join(lines[:300]) + "\n")
    (d / "valid.txt").write_text("\n".join(lines[300:350]) + "\n")
    (d / "test.txt").write_text("\n".join(lines[350:]) + "\n")
    return d


@pytest.fixture(scope="module")
def trained(corpus):
    out = corpus / "model.pt"
    r = rnnlm("train", "--train", corpus / "train.txt", "--valid", corpus / "valid.txt", "--out", out,
              "--hidden", 16, "--classes", 4, "--max-epochs", 6, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["epochs"] >= 1 and summary["valid_perplexity"] < 15
    assert "words/s" in r.stderr and "valid perplexity" in r.stderr
    return out


def test_eval_static_and_dynamic_json(trained, corpus):
    static = rnnlm("eval", "--model", trained, "--test", corpus / "test.txt", "--json")
    dynamic = rnnlm("eval", "--model", trained, "--test", corpus / "test.txt", "--dynamic", 0.01, "--json")
    assert static.returncode == 0 and dynamic.returncode == 0, static.stderr + dynamic.stderr
    s, d = json.loads(static.stdout), json.loads(dynamic.stdout)
    for key in ("perplexity", "entropy_bits", "words", "oov", "words_per_sec"):
        assert key in s and key in d
    assert s["words"] == d["words"] == sum(len(l.split()) + 1 for l in (corpus / "test.txt").read_text().splitlines())
    assert s["oov"] == 0
    assert s["perplexity"] != d["perplexity"]
    assert 2 ** s["entropy_bits"] == pytest.approx(s["perplexity"], rel=1e-9)


def test_eval_counts_oov(trained, tmp_path):
    text = tmp_path / "oov.txt"
    text.write_text("the cat sees unicorns\nmy friend eats quasars\n")
    r = rnnlm("eval", "--model", trained, "--test", text, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["oov"] == 2 and result["words"] == 10


@pytest.mark.parametrize("problem", ["missing", "empty", "latin1", "bad-model"])
def test_errors_are_one_clear_line(trained, corpus, tmp_path, problem):
    test_file, model = corpus / "test.txt", trained
    if problem == "missing":
        test_file = tmp_path / "nope.txt"
    elif problem == "empty":
        test_file = tmp_path / "empty.txt"
        test_file.write_text("\n \n")
    elif problem == "latin1":
        test_file = tmp_path / "latin1.txt"
        test_file.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    else:
        model = tmp_path / "model.pt"
        model.write_bytes(b"PK\x03\x04 not really a zip")
    r = rnnlm("eval", "--model", model, "--test", test_file)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:")
    expected = {"missing": "no such file", "empty": "no text", "latin1": "not UTF-8", "bad-model": "not an rnnlm-model file, or a damaged one"}
    assert expected[problem] in lines[0]


def test_help_explains_the_commands():
    r = rnnlm("--help")
    assert r.returncode == 0
    for command in ("train", "eval"):
        assert command in r.stdout
    r = rnnlm("eval", "--help")
    assert "--dynamic" in r.stdout and "0.01" in r.stdout


def test_train_with_direct_connections_and_a_size_too_small(corpus, tmp_path):
    out = tmp_path / "rnnme.pt"
    common = ("train", "--train", corpus / "train.txt", "--valid", corpus / "valid.txt", "--out", out,
              "--hidden", 8, "--classes", 4, "--max-epochs", 3, "--threads", 2)
    r = rnnlm(*common, "--direct", 0.01, "--direct-order", 4, "--direct-l2", 1e-4, "--json")
    assert r.returncode == 0, r.stderr
    assert "direct 10,000 weights order 4" in r.stderr
    from rnnlm.checkpoint import load_model
    model = load_model(out)
    assert (model.config.direct_size, model.config.direct_order, model.config.direct_l2) == (10_000, 4, 1e-4)
    assert model.weights.D.any()
    dynamic = rnnlm("eval", "--model", out, "--test", corpus / "test.txt", "--dynamic", 0.01, "--json")
    assert dynamic.returncode == 0 and json.loads(dynamic.stdout)["perplexity"] < 15, dynamic.stderr
    too_small = rnnlm(*common, "--direct", 0.00001)
    assert too_small.returncode == 2 and "direct size 10 is too small" in too_small.stderr
