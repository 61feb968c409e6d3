"""Crash safety: SIGKILL the daemon at random moments while a client streams and checkpoints are
being written (every 20 tokens), twenty times over the same state directory.

After every kill: every checkpoint file in the directory reads back whole and restores (never a
torn file). After every restart: the daemon resumed exactly the newest checkpoint's weights (a
probe's log-probabilities match the file's, computed here) and its update counter; that counter
is at least the one of the last checkpoint known to be complete (a `save` reply), and at most
twice --checkpoint-tokens plus one message's tokens behind the last reply seen before the kill
(checkpoints are written in the background: the updates made while one is being written are lost
with it, and a next one due before it is done waits for it).
"""

from __future__ import annotations

import random
import threading
import time

import msgpack
import numpy as np
import zmq

from rnnlm.checkpoint import load_model, read_checked, weights_from_tensors
from rnnlm.clients.client import Client
from rnnlm.daemon.learner import FROZEN, STATE_FORMAT, Learner
from rnnlm.model import OnlineRule
from tests.daemon_helpers import Daemon
from tests.test_model import toy_text

KILLS = 20
CHECKPOINT_TOKENS = 20
PROBE = "the cat sees a dog".split() + ["</s>"]


def newest_valid(state, model, rule) -> tuple[int, np.ndarray] | None:
    """Check every checkpoint file restores; the newest one's update count and probe log-probs."""
    files = sorted(state.glob("state-*.pt"))
    newest = None
    for path in files:
        payload = read_checked(path, STATE_FORMAT)  # raises on a torn or damaged file
        Learner(model, rule).restore(payload, str(path))
        newest = payload
    if newest is None:
        return None
    d = newest["domains"]["default"]
    cfg, vocab = model.config, model.vocab
    weights = weights_from_tensors(d["weights"], len(vocab), cfg.hidden, vocab.num_classes, "newest")
    logprobs, _, _ = model.score_words(PROBE, model.new_state(FROZEN), FROZEN, weights)
    return d["updates"], logprobs


def stream_until_killed(d: Daemon, lines: list[str], start: int, kill_after: float) -> dict:
    """Pipeline score requests (and a save every 10th) until the daemon dies; what was seen."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(d.endpoint)
    seen = {"last_updates": None, "saved_updates": None, "max_tokens": 0, "replies": 0, "saves": 0}
    kinds: dict[int, str] = {}
    killer = threading.Timer(kill_after, d.proc.kill)
    killer.start()
    rid, in_flight, i = 0, 0, start
    try:
        while d.proc.poll() is None:
            while in_flight < 16:
                rid += 1
                if rid % 10 == 0:
                    kinds[rid] = "save"
                    socket.send(msgpack.packb({"op": "save", "id": rid}))
                else:
                    kinds[rid] = "score"
                    socket.send(msgpack.packb({"op": "score", "id": rid, "stream": "s", "text": lines[i % len(lines)]}))
                    i += 1
                in_flight += 1
            if not socket.poll(100):
                continue
            reply = msgpack.unpackb(socket.recv(), raw=False)
            in_flight -= 1
            assert reply["ok"], reply
            seen["replies"] += 1
            if kinds.pop(reply["id"]) == "save":
                # Replies come in order: the checkpoint holds every update of the replies before it.
                seen["saved_updates"] = seen["last_updates"]
                seen["saves"] += 1
            else:
                seen["last_updates"] = reply["updates"]
                seen["max_tokens"] = max(seen["max_tokens"], reply["tokens"])
    finally:
        killer.cancel()
        socket.close(0)
    seen["next_line"] = i
    return seen


def test_sigkill_twenty_times_loses_at_most_what_followed_the_last_checkpoint(tmp_path, model_path):
    model = load_model(model_path)
    rule = OnlineRule(lr=0.01)
    state = tmp_path / "state"
    lines = toy_text(3000, seed=11)
    rng = random.Random(2024)
    known_saved = 0  # updates held by a checkpoint known to be complete
    last_seen = 0
    max_tokens = 0
    line = 0
    torn_writes = resumed = 0
    worst_loss = 0
    start = time.perf_counter()
    for kill in range(KILLS + 1):
        expected = newest_valid(state, model, rule)  # every file whole and usable
        with Daemon(tmp_path, model_path, "--checkpoint-tokens", str(CHECKPOINT_TOKENS), "--keep-checkpoints", "2",
                    state_dir=state) as d:
            assert not list(state.glob(".state-*.tmp")), "the daemon removed the interrupted write's file"
            with Client(d.endpoint) as c:
                updates = c.stats()["domains"].get("default", {}).get("updates", 0)
                probe = c.score(tokens=PROBE, stream=f"probe-{kill}", learn=False)["logprobs"]
                c.reset(f"probe-{kill}")
            if expected is not None:
                resumed += 1
                assert "resumed from" in d.output()
                assert updates == expected[0]
                np.testing.assert_array_equal(np.array(probe), expected[1])
            assert updates >= known_saved, "a completed checkpoint was lost"
            loss = last_seen - updates
            worst_loss = max(worst_loss, loss)
            assert loss < 2 * CHECKPOINT_TOKENS + max(max_tokens, 1), (loss, last_seen, updates)
            if kill == KILLS:
                assert d.stop() == 0
                break
            seen = stream_until_killed(d, lines, line, rng.uniform(0.05, 0.6))
            assert d.proc.wait(10) == -9
        line = seen["next_line"]
        known_saved = max(known_saved, seen["saved_updates"] or 0)
        last_seen = max(updates, seen["last_updates"] if seen["last_updates"] is not None else updates)
        max_tokens = max(max_tokens, seen["max_tokens"])
        torn_writes += bool(list(state.glob(".state-*.tmp")))
    seconds = time.perf_counter() - start
    print(f"{KILLS} SIGKILLs survived in {seconds:.0f} s: {resumed} restarts resumed the newest checkpoint exactly; "
          f"{torn_writes} kills interrupted a checkpoint write (its temporary file left, never a torn state file); "
          f"most updates lost {worst_loss} (bound: < 2 × {CHECKPOINT_TOKENS} + {max_tokens} tokens of one message); "
          f"final updates {updates}")
    assert resumed >= KILLS - 1
