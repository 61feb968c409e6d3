"""Daemon benchmark: end-to-end throughput over ZeroMQ, latency, RSS, and agreement with offline eval.

    .venv/bin/python bench/bench_daemon.py --model runs/bench-ptb200.pt [--data ../shared/data/ptb]

In one run: the in-process online step's words/s on the test text (one thread); then a real
`rnnlm serve` process, the test text streamed through it as one stream, one message per line
(~22 words), by a pipelining client: words/s, per-message latency p50/p99 seen by the client,
the daemon's RSS; the streamed perplexity against `evaluate` (dynamic, then learn: false vs static).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rnnlm.checkpoint import load_model
from rnnlm.clients.client import Client
from rnnlm.corpus import read_lines, tokenize_line
from rnnlm.evaluate import evaluate
from rnnlm.model import OnlineRule

from bench_core import online_step_one_word_at_a_time
from daemon_process import rss_mb, start_daemon

REPO = Path(__file__).resolve().parent.parent


def stream_through(endpoint: str, lines: list[str], stream: str, learn: bool, window: int, domain: str = "default"):
    sent: dict[int, float] = {}
    latencies, loss, words = [], 0.0, 0
    with Client(endpoint) as client:
        def requests():
            for line in lines:
                sent[len(sent)] = time.perf_counter()
                yield {"op": "score", "stream": stream, "domain": domain, "text": line, "learn": learn}

        start = time.perf_counter()
        for i, reply in enumerate(client.pipeline(requests(), window)):
            latencies.append(time.perf_counter() - sent[i])
            reply = client.checked(reply)
            loss += reply["loss"]
            words += reply["tokens"]
        seconds = time.perf_counter() - start
    return words, loss, seconds, np.array(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ptb"))
    parser.add_argument("--window", type=int, default=64, help="requests in flight")
    args = parser.parse_args()
    lines = read_lines(Path(args.data) / "ptb.test.txt")
    words = [w for line in lines for w in tokenize_line(line)]
    model = load_model(args.model)
    print(f"{len(lines):,} messages (one per line), {len(words):,} words, {len(words) / len(lines):.1f} words/message")

    static = evaluate(model, words)
    dynamic = evaluate(model, words, OnlineRule(), weights=model.weights.copy())
    one_word_wps, _ = online_step_one_word_at_a_time(model, words, OnlineRule())
    print(f"in-process online step (one thread): {dynamic.words_per_sec:,.0f} words/s over the stream, "
          f"{one_word_wps:,.0f} words/s called once per word; "
          f"dynamic perplexity {dynamic.perplexity:.3f}; static {static.perplexity:.3f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        proc, ports = start_daemon(Path(tmp), ["--model", args.model])
        try:
            rss_idle = rss_mb(proc.pid)
            n, loss, seconds, latency = stream_through(ports["endpoint"], lines, "bench", True, args.window)
            rss_after = rss_mb(proc.pid)
            n_frozen, loss_frozen, _, _ = stream_through(ports["endpoint"], lines, "frozen", False, args.window, domain="frozen")
            _, _, _, unloaded = stream_through(ports["endpoint"], lines[:1000], "one-by-one", True, 1, domain="one-by-one")
        finally:
            proc.terminate()
            proc.wait(60)
    streamed_ppl, frozen_ppl = np.exp(loss / n), np.exp(loss_frozen / n_frozen)
    wps = n / seconds
    print(f"daemon, {args.window} requests in flight: {wps:,.0f} words/s end to end "
          f"({wps / dynamic.words_per_sec:.0%} of the in-process stream, {wps / one_word_wps:.0%} of one call per word); latency p50 {1000 * np.percentile(latency, 50):.2f} ms, "
          f"p99 {1000 * np.percentile(latency, 99):.2f} ms (queueing included); RSS {rss_idle:.0f} MB idle, {rss_after:.0f} MB after")
    print(f"streamed perplexity {streamed_ppl:.3f} vs offline dynamic {dynamic.perplexity:.3f} "
          f"(relative difference {abs(streamed_ppl - dynamic.perplexity) / dynamic.perplexity:.1e}); "
          f"learn: false {frozen_ppl:.3f} vs static {static.perplexity:.3f} "
          f"({abs(frozen_ppl - static.perplexity) / static.perplexity:.1e})")
    print(f"one request at a time: latency p50 {1000 * np.percentile(unloaded, 50):.2f} ms, "
          f"p99 {1000 * np.percentile(unloaded, 99):.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
