"""The C client (clients/c) against a live daemon: the wire protocol needs nothing from Python.

The toolchain and libraries (cc, make, pkg-config, libzmq3-dev, libmsgpack-dev) are a CI
requirement: when they are missing this test fails, it does not skip.
"""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from clients.client import Client
from tests.daemon_helpers import Daemon, small_trained_model
from tests.test_model import toy_text
from tests.test_trust import keys  # noqa: F401 (a fixture)

SOURCE = Path(__file__).resolve().parent.parent / "clients" / "c"
APT_HINT = "apt-get install -y --no-install-recommends build-essential pkg-config libzmq3-dev libmsgpack-dev"

# Known words, a rare training name, a word never seen, and a blank line (not sent; its number is skipped).
LINES = ["the cat sees fish", "a dog likes the ball", "", "zorro eats bread", "my friend eats qwertyuiop"]
SENT = [(number, line) for number, line in enumerate(LINES, 1) if line.strip()]


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    missing = [tool for tool in ("make", "cc") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"cannot build the C client: {', '.join(missing)} not found; install them: {APT_HINT}")
    build = tmp_path_factory.mktemp("c-build")
    done = subprocess.run(["make", "-C", str(SOURCE), f"BUILD={build}"], capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"building the C client failed (are libzmq3-dev and libmsgpack-dev installed? {APT_HINT}):\n{output}")
    assert "warning" not in output, f"the C client must build without warnings:\n{output}"
    return build / "rnnlm_client"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return small_trained_model(tmp_path_factory.mktemp("model") / "m.pt", toy_text(300))


def run_client(binary: Path, endpoint: str, lines: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), endpoint, *args], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=90)


def parse(stdout: str) -> tuple[list[tuple[int, int, float, float]], float, int]:
    *records, summary = stdout.splitlines()
    label, perplexity, words_label, words = summary.split("\t")
    assert (label, words_label) == ("perplexity", "words"), summary
    rows = [(int(i), int(t), float(loss), float(ppl)) for i, t, loss, ppl in (r.split("\t") for r in records)]
    return rows, float(perplexity), int(words)


def test_c_client_scores_like_the_python_client(binary, model, tmp_path):
    with Daemon(tmp_path, model) as daemon:
        done = run_client(binary, daemon.endpoint, LINES, "--stream", "doc-1")
        assert done.returncode == 0, f"{done.stderr}\ndaemon log:\n{daemon.output()}"
        rows, perplexity, words = parse(done.stdout)

        assert [r[0] for r in rows] == [number for number, _ in SENT]  # ids are input line numbers
        assert [r[1] for r in rows] == [len(line.split()) + 1 for _, line in SENT]  # each line ends with </s>
        assert words == sum(r[1] for r in rows)
        total_loss = sum(r[2] for r in rows)
        assert perplexity == pytest.approx(math.exp(total_loss / words), abs=1e-6)
        assert rows[-1][3] == pytest.approx(math.exp(total_loss / words), rel=1e-9)  # a fresh stream: the same
        assert 1.0 < perplexity < 1e4

        # The flags reach the daemon: a domain that does not exist, read without learning (so it is
        # not created: its tokens are counted under the label of scores against no domain).
        done = run_client(binary, daemon.endpoint, LINES[:2], "--stream", "doc-2", "--domain", "legal", "--no-learn")
        assert done.returncode == 0, done.stderr
        _, _, legal_words = parse(done.stdout)
        with Client(daemon.endpoint) as client:
            assert "legal" not in client.stats()["domains"]
        assert daemon.metric("rnnlm_tokens_total", domain="_none") == legal_words == 5 + 6
        # learning, the domain is made
        done = run_client(binary, daemon.endpoint, LINES[:2], "--stream", "doc-3", "--domain", "legal")
        with Client(daemon.endpoint) as client:
            assert client.stats()["domains"]["legal"]["updates"] == 5 + 6

    # The same lines from the Python client, on a fresh stream of a fresh daemon (learning as above).
    with Daemon(tmp_path, model) as fresh, Client(fresh.endpoint) as client:
        replies = [client.score(line, stream="doc-1") for _, line in SENT]
    assert [r["tokens"] for r in replies] == [r[1] for r in rows]
    assert [r["loss"] for r in replies] == pytest.approx([r[2] for r in rows], rel=1e-9)
    assert replies[-1]["stream_perplexity"] == pytest.approx(perplexity, abs=1e-6)


def test_an_error_reply_goes_to_stderr_with_exit_status_1(binary, model, tmp_path):
    with Daemon(tmp_path, model) as daemon:
        done = run_client(binary, daemon.endpoint, LINES, "--domain", "d" * 200)
        assert done.returncode == 1, done
        assert done.stdout == ""
        code_and_message = done.stderr.splitlines()[-1].split("\t")
        assert code_and_message[:2] == ["error", "bad_request"] and "domain" in code_and_message[2]

        # Text that is not UTF-8: the daemon cannot read the request, so its error reply has id nil.
        done = subprocess.run([str(binary), daemon.endpoint], input=b"the cat\n\xff\xfe sees fish\n", capture_output=True, timeout=90)
        assert done.returncode == 1, done
        scored = done.stdout.decode().splitlines()
        assert len(scored) == 1 and scored[0].startswith("1\t")  # line 1 scored, then it stops: no summary
        assert done.stderr.decode().split("\t")[:2] == ["error", "bad_utf8"]


def test_no_daemon_times_out_with_exit_status_2(binary):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    done = run_client(binary, endpoint, LINES, "--timeout", "0.5")
    assert done.returncode == 2
    assert "no reply" in done.stderr and done.stdout == ""


def test_c_client_speaks_curve_to_a_curve_daemon(binary, model, tmp_path, keys):  # noqa: F811
    k = keys / "keys"
    with Daemon(tmp_path, model, "--curve-secret-key", k / "server.key_secret",
                "--curve-authorized-dir", keys / "authorized") as daemon:
        done = run_client(binary, daemon.endpoint, LINES, "--stream", "doc-1", "--curve-secret-key",
                          str(k / "alice.key_secret"), "--curve-server-key", str(k / "server.key"))
        assert done.returncode == 0, f"{done.stderr}\ndaemon log:\n{daemon.output()}"
        rows, perplexity, words = parse(done.stdout)
        assert [r[0] for r in rows] == [number for number, _ in SENT] and 1.0 < perplexity < 1e4
        # without keys, and with a key the daemon does not know: no reply (the handshake fails)
        for args in ((), ("--curve-secret-key", str(k / "mallory.key_secret"), "--curve-server-key", str(k / "server.key"))):
            done = run_client(binary, daemon.endpoint, LINES, "--timeout", "1", *args)
            assert done.returncode == 2 and "no reply" in done.stderr, done
        assert daemon.stop() == 0
