"""What a user sees when something is wrong: one line naming the option and the value, the
documented exit status (2: a value that can never work, 1: one that does not work here and now),
no traceback; and training that can be interrupted without losing what it learned."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys

import pytest

from rnnlm.checkpoint import CheckpointError, load_model
from rnnlm.corpus import read_tokens
from rnnlm.evaluate import evaluate
from rnnlm.model import RNNLM, Config
from rnnlm.train import train
from rnnlm.vocab import Vocabulary
from tests.test_model import toy_text, words_of


def rnnlm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "rnnlm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def rnnlm_all(*commands: tuple) -> list[subprocess.CompletedProcess]:
    """Several `rnnlm` commands at once (each pays for starting Python and importing torch)."""
    procs = [subprocess.Popen([sys.executable, "-m", "rnnlm.cli", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    results = []
    for proc, args in zip(procs, commands):
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def one_error_line(result, status: int, *expected: str) -> str:
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "WARNING" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "text.txt").write_text("\n".join(toy_text(40)) + "\n")
    return d


@pytest.fixture
def busy_port():
    """A TCP port on loopback with a listener on it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield listener.getsockname()[1]
    listener.close()


def test_stream_to_a_malformed_endpoint(texts):
    one_error_line(rnnlm("stream", texts / "text.txt", "--connect", "nonsense"), 2, "--connect 'nonsense'",
                   "tcp://127.0.0.1:5555")


def test_serve_checks_addresses_before_anything_else(busy_port):
    """No CURVE warning, no model loading: the bad address is the one thing said, named with its
    option; exit status 2 for what can never work, 1 for what is in use."""
    cases = [("--bind", "tcp://nohost:1", 2), ("--bind", "foo://x", 2), ("--bind", f"tcp://127.0.0.1:{busy_port}", 1),
             ("--metrics-addr", "9109", 2), ("--metrics-addr", "nohost:9109", 2),
             ("--metrics-addr", f"127.0.0.1:{busy_port}", 1)]
    defaults = {"--bind": "tcp://127.0.0.1:0", "--metrics-addr": "127.0.0.1:0"}
    results = rnnlm_all(*(["serve", *[a for o, v in {**defaults, option: value}.items() for a in (o, v)]]
                          for option, value, _ in cases))
    for (option, value, status), result in zip(cases, results):
        line = one_error_line(result, status, f"{option} '{value}'")
        if status == 1:
            assert "Address already in use" in line, line


def test_a_model_that_is_not_one_is_said_calmly(texts, tmp_path):
    """Tampering wording only for a pickle that really names code; text or noise is 'not a model'."""
    models = {content: tmp_path / f"{content}.pt" for content in ("text", "random", "code")}
    models["text"].write_text("the cat sat on the mat\n")
    models["random"].write_bytes(bytes(range(256)) * 16 + os.urandom(4096))
    models["code"].write_bytes(pickle.dumps({"format": "rnnlm-model", "run": Exec()}))
    results = rnnlm_all(*(["eval", "--model", model, "--test", texts / "text.txt"] for model in models.values()))
    for (content, model), result in zip(models.items(), results):
        line = one_error_line(result, 1, str(model))
        if content == "code":
            assert "refused: it holds code" in line and "builtins.exec" in line
        else:
            assert "not an rnnlm-model file" in line and "code" not in line
        with pytest.raises(CheckpointError):
            load_model(model)


class Exec:
    def __reduce__(self):
        return (exec, ("raise SystemExit('this must never run')",))


def test_train_checks_out_before_training(texts):
    outs = ["/proc/m.pt", "/nonexistent/dir/m.pt"]
    results = rnnlm_all(*(["train", "--train", texts / "text.txt", "--valid", texts / "text.txt", "--out", out]
                          for out in outs))
    for out, result in zip(outs, results):
        one_error_line(result, 1, f"--out '{out}'")
        assert "epoch" not in result.stderr, "no training before the check"
    assert not os.path.exists("/nonexistent"), "no directories created"


def test_training_progress_reports_the_epochs_rate():
    """Every progress report carries the words/s of the epoch so far (it once divided by the time
    since the first report, and showed rates of 10^8)."""
    lines = toy_text(3000)
    words = words_of(lines)
    model = RNNLM.create(Config(hidden=16, classes=4, max_epochs=2), Vocabulary.build(words, 1, 4))
    reports = []
    report = train(model, words, words[:500], 1, lambda epoch, done, total, tally: reports.append(
        (epoch, done, tally.seconds, tally.words_per_sec)))
    assert len(reports) >= 2
    for epoch, done, seconds, wps in reports:
        final = report.epochs[epoch - 1].train
        assert seconds > 0 and math.isfinite(wps)
        assert done / final.seconds <= wps <= 5 * final.words_per_sec, (wps, final.words_per_sec)


def test_ctrl_c_during_training_saves_the_best_model_so_far(tmp_path):
    """A real SIGINT in the middle of an epoch: the weights of the last finished epoch are saved,
    the message says where, and the exit status is 130; with stderr a pipe, one line per epoch."""
    (tmp_path / "train.txt").write_text("\n".join(toy_text(40_000)) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(toy_text(300, seed=1)) + "\n")
    out = tmp_path / "m.pt"
    proc = subprocess.Popen([str(a) for a in (sys.executable, "-m", "rnnlm.cli", "train", "--train", tmp_path / "train.txt",
                             "--valid", tmp_path / "valid.txt", "--out", out, "--hidden", 32, "--classes", 4,
                             "--threads", 1, "--max-epochs", 50, "--min-improvement", 1)],
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith("epoch  2"):
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    lines += rest.splitlines()
    assert proc.returncode == 130, lines
    assert "Traceback" not in rest
    epochs = [line for line in lines if line.startswith("epoch")]
    assert len(lines) == 1 + len(epochs) + 1, lines  # vocabulary, each epoch, the interruption: no bar on a pipe
    assert lines[-1].startswith("interrupted: saved the best model so far") and str(out) in lines[-1], lines
    saved = load_model(out)
    said = float(lines[-1].split("valid perplexity ")[1].split(")")[0])
    best_printed = min(float(e.split("valid perplexity")[1].split()[0]) for e in epochs)
    assert said == pytest.approx(best_printed, abs=0.006)
    assert evaluate(saved, read_tokens(tmp_path / "valid.txt")).perplexity == pytest.approx(said, abs=0.006)


def test_stream_on_a_pipe_prints_no_line_per_message(tmp_path, model_path, texts):
    from tests.daemon_helpers import Daemon

    with Daemon(tmp_path, model_path) as d:
        r = rnnlm("stream", texts / "text.txt", "--connect", d.endpoint, "--json")
        assert d.stop() == 0
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["words"] == sum(len(line.split()) + 1 for line in toy_text(40))
    assert len(r.stderr.splitlines()) <= 1, r.stderr
