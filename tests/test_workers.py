"""Parallel learners (--workers): the same traffic gives the same replies and weights as one learner.

Mixed traffic of three domains (two streams each, a `learn: false` score, a reset, a stats and a
numbered stream among them) is pipelined through a `--workers 1` and a `--workers 3` daemon; every
reply and every saved weight and stream state must be equal bit for bit. The three-worker daemon
must really have spread the domains (one per worker, each worker busy).
"""

from __future__ import annotations

import numpy as np

from rnnlm.checkpoint import read_checked
from rnnlm.clients.client import Client
from rnnlm.daemon.learner import STATE_FORMAT
from tests.daemon_helpers import Daemon
from tests.test_model import toy_text

DOMAINS = ("news", "chat", "law")


def traffic() -> list[dict]:
    """Messages in the order they are sent: domains interleaved, runs of one stream among them."""
    lines = toy_text(160)
    requests = []
    for i, line in enumerate(lines):
        domain = DOMAINS[i % 3] if i % 7 else DOMAINS[0]  # every 7th goes to news: runs of one stream
        stream = f"s{i % 2}" if domain != "law" else "s0"
        requests.append({"op": "score", "stream": stream, "domain": domain, "text": line})
        if i == 60:
            requests.append({"op": "score", "stream": "look", "domain": "chat", "text": line, "learn": False})
            requests.append({"op": "stats"})
        if i == 90:
            requests.append({"op": "reset", "stream": "s1", "domain": "news"})
    numbered = [{"op": "score", "stream": "n", "domain": "law", "text": line, "seq": k + 1}
                for k, line in enumerate(lines[:20])]
    return requests[:100] + numbered + requests[100:]


def replay(tmp_path, model_path, workers: int) -> tuple[list[dict], dict, str]:
    state = tmp_path / f"state-{workers}"
    with Daemon(tmp_path, model_path, "--workers", str(workers), state_dir=state) as d:
        with Client(d.endpoint, timeout=60) as client:
            replies = list(client.pipeline(traffic(), window=64, check=False))
            path = client.save()["path"]
        metrics = d.scrape()
        assert d.stop() == 0, d.output()
    return replies, read_checked(path, STATE_FORMAT), metrics


def test_three_workers_answer_and_learn_exactly_as_one(tmp_path, model_path):
    one, saved_one, _ = replay(tmp_path, model_path, 1)
    three, saved_three, metrics = replay(tmp_path, model_path, 3)

    assert len(one) == len(three) == len(traffic())
    for a, b in zip(one, three):
        if "seconds_since_checkpoint" in a:  # the stats reply: everything but the clock
            a, b = dict(a, seconds_since_checkpoint=0), dict(b, seconds_since_checkpoint=0)
        assert a == b
    assert all(r["ok"] for r in one), [r for r in one if not r["ok"]]

    assert sorted(saved_one["domains"]) == sorted(saved_three["domains"]) == sorted(DOMAINS)
    for name in DOMAINS:
        a, b = saved_one["domains"][name], saved_three["domains"][name]
        assert (a["updates"], a["tally"]) == (b["updates"], b["tally"])
        for w in a["weights"]:
            np.testing.assert_array_equal(a["weights"][w].numpy(), b["weights"][w].numpy())
    streams = lambda saved: [(s["domain"], s["stream"]) for s in saved["streams"]]  # noqa: E731
    rows = {key: i for i, key in enumerate(streams(saved_three))}
    assert sorted(streams(saved_one)) == sorted(rows)
    for i, key in enumerate(streams(saved_one)):  # the same states (the order may differ: LRU)
        for field, array in saved_one["stream_states"].items():
            np.testing.assert_array_equal(array[i].numpy(), saved_three["stream_states"][field][rows[key]].numpy())

    # Each domain had a worker of its own, and each worker scored.
    samples = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in metrics.splitlines()
               if line.startswith("rnnlm_worker_")}
    for w in range(3):
        assert samples[f'rnnlm_worker_domains{{worker="{w}"}}'] == 1
        assert samples[f'rnnlm_worker_busy_seconds_total{{worker="{w}"}}'] > 0
        assert samples[f'rnnlm_worker_queue_depth{{worker="{w}"}}'] == 0


def test_the_compiled_step_lets_other_threads_run():
    """Workers learn in parallel only if the step releases the GIL: while one thread is inside it,
    another thread's Python loop keeps turning, at many times the rate it gets beside a compiled
    loop that holds the GIL (the control, measured in the same run)."""
    import threading
    import time

    from numba import njit

    from rnnlm.bundled import DEFAULT_MODEL
    from rnnlm.checkpoint import load_model
    from rnnlm.model import OnlineRule

    @njit(nogil=False)
    def holds_the_gil(n):
        total = 0.0
        for i in range(n):
            total += np.sqrt(i)
        return total

    model, rule = load_model(DEFAULT_MODEL), OnlineRule()
    ids = np.random.default_rng(0).integers(0, len(model.vocab), 20_000)
    model.step(ids[:10], model.new_state(rule), rule, model.weights.copy())  # compiled before timing
    holds_the_gil(10)

    def turns_per_second_beside(call) -> float:
        done = threading.Event()
        worker = threading.Thread(target=lambda: (call(), done.set()))
        start, turns = time.perf_counter(), 0
        worker.start()
        while not done.is_set():
            turns += 1
        worker.join()
        return turns / (time.perf_counter() - start)

    beside_step = turns_per_second_beside(lambda: model.step(ids, model.new_state(rule), rule, model.weights.copy()))
    beside_gil = turns_per_second_beside(lambda: holds_the_gil(200_000_000))
    assert beside_step > 10 * beside_gil, (beside_step, beside_gil)
