"""Bounds of the daemon's side channels: /metrics connections, SIGHUP, and fair intake from PULL."""

from __future__ import annotations

import shutil
import signal
import socket
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import zmq

from rnnlm.checkpoint import load_model
from rnnlm.clients.client import Client
from rnnlm.daemon.server import DEFAULT_MODEL
from tests.daemon_helpers import Daemon
from tests.test_trust import keys, wait_for  # noqa: F401 (a fixture)


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_300_half_open_metrics_connections_leave_threads_bounded_and_metrics_answering(tmp_path, model_path):
    with Daemon(tmp_path, model_path) as d:
        d.scrape()
        idle = threads_of(d.proc.pid)
        host, port = d.metrics_url.split("/")[2].split(":")
        held = []
        for _ in range(300):
            conn = socket.create_connection((host, int(port)))
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            held.append(conn)
        time.sleep(1.0)
        busy = threads_of(d.proc.pid)
        # A scrape gets through within the connection timeout (5 s), while all 300 are still open.
        start = time.monotonic()
        text = None
        while text is None and time.monotonic() - start < 15:
            try:
                text = urllib.request.urlopen(d.metrics_url, timeout=10).read().decode()
            except OSError:
                time.sleep(0.2)
        waited = time.monotonic() - start
        print(f"/metrics: {idle} threads idle, {busy} with 300 half-open connections; a scrape answered after "
              f"{waited:.1f} s")
        assert busy <= idle + 8, (idle, busy)
        assert text is not None and "rnnlm_tokens_total" in text or "rnnlm_checkpoints_total" in text
        for conn in held:
            conn.close()
        assert d.stop() == 0


def test_sighup_reloads_the_authorised_keys_and_never_kills_the_daemon(tmp_path, keys, model_path):  # noqa: F811
    k = keys / "keys"
    authorized = tmp_path / "authorized"
    shutil.copytree(keys / "authorized", authorized)
    with Daemon(tmp_path, model_path, "--curve-secret-key", k / "server.key_secret",
                "--curve-authorized-dir", authorized, state_dir=tmp_path / "state") as d:
        with Client(d.endpoint, timeout=1.5, curve=(k / "mallory.key_secret", k / "server.key")) as mallory:
            with pytest.raises(TimeoutError):  # mallory is not authorised yet
                mallory.ping()
        shutil.copy(k / "mallory.key", authorized / "mallory.key")
        d.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "CURVE on: 2 authorised client key(s)" in d.output(), seconds=10), d.output()
        assert d.proc.poll() is None, "SIGHUP killed the daemon"
        with Client(d.endpoint, timeout=10, curve=(k / "mallory.key_secret", k / "server.key")) as mallory:
            assert mallory.ping()["pong"]
        (authorized / "alice.key").unlink()
        d.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: d.output().count("CURVE on: ") == 3, seconds=10)
        assert d.output().strip().splitlines()[-1].endswith(f"CURVE on: 1 authorised client key(s) in {authorized}")
        with Client(d.endpoint, timeout=1.5, curve=(k / "alice.key_secret", k / "server.key")) as alice:
            with pytest.raises(TimeoutError):  # alice's key was removed
                alice.ping()
        assert d.stop() == 0, d.output()


def test_pull_is_served_while_router_has_a_backlog(tmp_path):
    """With --max-pending 10 and hundreds of ROUTER messages waiting, PULL's messages are taken in
    turn with ROUTER's, not after the whole backlog."""
    with Daemon(tmp_path, None, "--max-pending", "10", "--pull-bind", "tcp://127.0.0.1:0") as d:
        words = [w for w in load_model(DEFAULT_MODEL).vocab.words if not w.startswith("<")]
        rng = np.random.default_rng(1)
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(d.endpoint)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(d.pull_endpoint)
        backlog = 120
        for i in range(backlog):
            dealer.send(msgpack.packb({"op": "score", "id": i, "stream": "r",
                                       "tokens": [str(w) for w in rng.choice(words, 1000)]}))
        time.sleep(0.2)
        for i in range(20):
            push.send(msgpack.packb({"op": "score", "stream": f"p{i}", "domain": "pushed", "text": "the cat"}))
        replies = 0
        pulled_at = None
        while replies < backlog:
            assert dealer.poll(60_000)
            assert msgpack.unpackb(dealer.recv(), raw=False)["ok"]
            replies += 1
            if pulled_at is None and replies % 10 == 0 and d.metric("rnnlm_messages_total", socket="pull",
                                                                     op="score", outcome="ok") >= 20:
                pulled_at = replies
        print(f"the 20 PULL messages were all handled after {pulled_at} of {backlog} ROUTER replies")
        assert pulled_at is not None and pulled_at <= backlog // 2, pulled_at
        dealer.close()
        push.close()
        assert d.stop() == 0
