"""Exactly-once learning when a client retries: per-stream `seq` numbers on score requests."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import msgpack
import numpy as np
import zmq

from rnnlm.checkpoint import read_checked
from rnnlm.clients.async_client import AsyncClient
from rnnlm.clients.client import Client
from rnnlm.daemon.learner import STATE_FORMAT
from tests.daemon_helpers import Daemon

LINES = ["the cat sees fish", "a dog likes bread", "my friend eats the ball"]


def domain_arrays(path: str, domain: str) -> dict[str, np.ndarray]:
    saved = read_checked(path, STATE_FORMAT)["domains"][domain]
    return {name: tensor.numpy() for name, tensor in saved["weights"].items()}


def resume_after(daemon: Daemon, seconds: float) -> threading.Timer:
    """Stop the daemon now (SIGSTOP) and let it go on (SIGCONT) after `seconds`."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, os.kill, (daemon.proc.pid, signal.SIGCONT))
    timer.start()
    return timer


def test_a_retried_score_is_learned_once(tmp_path, model_path):
    """The daemon is paused while a score is in flight; the client times out twice and sends it
    again each time. The daemon gets the message three times and learns from it once: the domain's
    weights equal, bit for bit, those of a domain that got each message once."""
    with Daemon(tmp_path, model_path, state_dir=tmp_path / "state") as d:
        with Client(d.endpoint) as once:
            single = [once.score(line, stream="s", domain="once") for line in LINES]
        with Client(d.endpoint, timeout=0.5, retries=5) as c:
            replies = [c.score(LINES[0], stream="s", domain="retried")]
            timer = resume_after(d, 1.2)
            replies.append(c.score(LINES[1], stream="s", domain="retried"))  # sent three times
            timer.join()
            replies.append(c.score(LINES[2], stream="s", domain="retried"))
            assert c.stale_replies >= 1, "the first attempt's reply came late and was dropped"
            stats = c.stats()["domains"]
            path = c.save()["path"]
        for a, b in zip(replies, single):
            assert a["logprobs"] == b["logprobs"] and a["stream_tokens"] == b["stream_tokens"]
        assert stats["retried"]["updates"] == stats["once"]["updates"] == sum(r["tokens"] for r in single)
        retried, reference = domain_arrays(path, "retried"), domain_arrays(path, "once")
        for name in reference:
            np.testing.assert_array_equal(retried[name], reference[name])
        assert d.stop() == 0


def send(socket: zmq.Socket, **request) -> dict:
    socket.send(msgpack.packb({"v": 1, "op": "score", "stream": "raw", **request}))
    assert socket.poll(20_000), "no reply"
    return msgpack.unpackb(socket.recv())


def test_duplicates_out_of_order_and_restart(tmp_path, model_path):
    state = tmp_path / "state"
    ctx = zmq.Context.instance()
    with Daemon(tmp_path, model_path, state_dir=state) as d:
        s = ctx.socket(zmq.DEALER)
        s.connect(d.endpoint)
        first = send(s, id=1, seq=1, text=LINES[0])
        again = send(s, id=2, seq=1, text=LINES[0])
        assert first["ok"] and again["ok"] and again["id"] == 2 and again["duplicate"] is True
        assert again["logprobs"] == first["logprobs"] and again["updates"] == first["updates"]
        assert again["stream_tokens"] == first["stream_tokens"], "a duplicate is not scored again"
        skipped = send(s, id=3, seq=3, text=LINES[1])
        assert not skipped["ok"] and skipped["error"]["code"] == "out_of_order"
        assert skipped["error"]["expected"] == 2 and "seq 3" in skipped["error"]["message"]
        assert not send(s, id=4, seq=1.5, text=LINES[1])["ok"], "seq is an int"
        second = send(s, id=5, seq=2, text=LINES[1])
        assert second["ok"] and "duplicate" not in second and second["stream_tokens"] == first["tokens"] + second["tokens"]
        s.close(0)
        assert d.stop() == 0
    with Daemon(tmp_path, model_path, state_dir=state) as d:
        s = ctx.socket(zmq.DEALER)
        s.connect(d.endpoint)
        repeat = send(s, id=6, seq=2, text=LINES[1])
        assert repeat["ok"] and repeat["duplicate"] is True and repeat["logprobs"] == second["logprobs"]
        assert send(s, id=7, seq=3, text=LINES[2])["ok"]
        s.close(0)
        with Client(d.endpoint, retries=1) as c:  # a new client adopts the stream's next number
            reply = c.score(LINES[0], stream="raw")
            assert reply["ok"] and "duplicate" not in reply
            assert c.numbers.last[("default", "raw")] == 4
            assert c.reset("raw")["existed"] is True
            assert c.score(LINES[0], stream="raw")["stream_tokens"] == 5, "reset starts the numbering again"
        assert d.stop() == 0


def test_async_client_retries_are_learned_once(tmp_path, model_path):
    async def run(d: Daemon) -> tuple[list[dict], list[dict], dict]:
        async with AsyncClient(d.endpoint) as once:
            single = [await once.score(line, stream="s", domain="once") for line in LINES]
        async with AsyncClient(d.endpoint, timeout=0.5, retries=5) as c:
            replies = [await c.score(LINES[0], stream="s", domain="retried")]
            timer = resume_after(d, 1.2)
            replies.append(await c.score(LINES[1], stream="s", domain="retried"))
            timer.join()
            replies.append(await c.score(LINES[2], stream="s", domain="retried"))
            return replies, single, (await c.stats())["domains"]

    with Daemon(tmp_path, model_path) as d:
        replies, single, stats = asyncio.run(run(d))
        assert d.stop() == 0
    assert [r["logprobs"] for r in replies] == [r["logprobs"] for r in single]
    assert stats["retried"]["updates"] == stats["once"]["updates"]
