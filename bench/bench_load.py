"""Load: many concurrent clients against one daemon, every reply accounted for; then a soak.

    .venv/bin/python bench/bench_load.py [--clients 32] [--messages 1000] [--soak-seconds 180]

Part 1: `--clients` threads, each with its own DEALER socket and its own stream, pipeline
`--messages` score requests each (one line of the bundled WikiText-2 sample per message, learning
on) against one `rnnlm serve` process. Every request id names its client; every reply is matched
to an outstanding request of the socket it arrived on. Printed: lost, duplicated and misrouted
replies (all must be 0), throughput, and the latency from send to reply (p50, p99, max).

Part 2 (the soak): `--soak-clients` clients keep streaming for `--soak-seconds`, over 4 domains
and 2,000 stream names against --max-streams 1000 (so streams are evicted and created all the
time); the daemon's RSS is printed at the start, every `--rss-every` seconds and at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import zmq

from rnnlm.corpus import read_lines

from daemon_process import rss_mb, start_daemon

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "rnnlm" / "data" / "sample.txt"
ID_BASE = 1_000_000  # request id = client * ID_BASE + sequence number


def scrape_sum(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


class LoadClient(threading.Thread):
    """One DEALER, `count` requests pipelined `window` deep; checks every reply it gets."""

    def __init__(self, ctx, endpoint, number, count, lines, window, barrier, timeout):
        super().__init__(daemon=True)
        self.ctx, self.endpoint, self.number, self.count = ctx, endpoint, number, count
        self.lines, self.window, self.barrier, self.timeout = lines, window, barrier, timeout
        self.latencies: list[float] = []
        self.duplicated = self.misrouted = self.errors = 0
        self.answered = 0
        self.words = 0

    def run(self) -> None:
        socket = self.ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.endpoint)
        sent: dict[int, float] = {}
        done: set[int] = set()
        next_seq = 0
        self.barrier.wait()
        last_progress = time.monotonic()
        while self.answered < self.count and time.monotonic() - last_progress < self.timeout:
            while next_seq < self.count and len(sent) < self.window:
                rid = self.number * ID_BASE + next_seq
                line = self.lines[(self.number * 7919 + next_seq) % len(self.lines)]
                sent[rid] = time.perf_counter()
                socket.send(msgpack.packb({"op": "score", "id": rid, "stream": f"client-{self.number}", "text": line}))
                next_seq += 1
            if not socket.poll(100):
                continue
            reply = msgpack.unpackb(socket.recv(), raw=False)
            now = time.perf_counter()
            rid = reply.get("id")
            if rid in sent:
                self.latencies.append(now - sent.pop(rid))
                done.add(rid)
                self.answered += 1
                self.words += reply.get("tokens", 0)
                self.errors += not reply.get("ok")
                last_progress = time.monotonic()
            elif rid in done:
                self.duplicated += 1
            else:
                self.misrouted += 1  # an id this socket never sent (or another client's)
        # Anything arriving after the last reply would be a duplicate or misrouted.
        while socket.poll(500):
            rid = msgpack.unpackb(socket.recv(), raw=False).get("id")
            if rid in done:
                self.duplicated += 1
            else:
                self.misrouted += 1
        socket.close(0)


def warm_up(endpoint: str, lines: list[str]) -> None:
    """The first messages pay for loading the compiled step; they are not what is measured."""
    from rnnlm.clients.client import Client

    with Client(endpoint) as c:
        list(c.pipeline({"op": "score", "stream": "warm-up", "text": line, "learn": False} for line in lines[:200]))


def load(endpoint: str, metrics: str, lines: list[str], clients: int, messages: int, window: int) -> None:
    ctx = zmq.Context()
    barrier = threading.Barrier(clients + 1)
    threads = [LoadClient(ctx, endpoint, n + 1, messages, lines, window, barrier, timeout=30.0) for n in range(clients)]
    before = scrape_sum(metrics, "rnnlm_messages_total")
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    total = clients * messages
    answered = sum(t.answered for t in threads)
    lost = total - answered
    duplicated = sum(t.duplicated for t in threads)
    misrouted = sum(t.misrouted for t in threads)
    errors = sum(t.errors for t in threads)
    handled = scrape_sum(metrics, "rnnlm_messages_total") - before
    lat = np.array([x for t in threads for x in t.latencies]) * 1000
    words = sum(t.words for t in threads)
    print(f"load: {clients} clients × {messages:,} messages (window {window} each), one stream per client, learning")
    print(f"  replies: {answered:,} of {total:,}; lost {lost}, duplicated {duplicated}, misrouted {misrouted}, "
          f"error replies {errors}; daemon counted {handled:,.0f} messages")
    print(f"  throughput {total / seconds:,.0f} messages/s, {words / seconds:,.0f} words/s ({seconds:.1f} s)")
    print(f"  latency send→reply: p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, "
          f"max {lat.max():.1f} ms")
    ctx.term()
    if lost or duplicated or misrouted or errors or handled != total:
        raise SystemExit("FAILED: replies lost, duplicated, misrouted or refused")


def soak(endpoint: str, pid: int, lines: list[str], clients: int, seconds: float, rss_every: float) -> None:
    ctx = zmq.Context()
    stop = threading.Event()
    counts = [0] * clients
    wrong: list[dict] = []  # replies that are errors or answer no request of their socket

    def client(n: int) -> None:
        socket = ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        k, in_flight = 0, set()
        while not stop.is_set() or in_flight:
            while not stop.is_set() and len(in_flight) < 8:
                socket.send(msgpack.packb({"op": "score", "id": k, "stream": f"soak-{n}-{k % 500}",
                                           "domain": f"domain-{k % 4}", "text": lines[(n * 31 + k) % len(lines)]}))
                in_flight.add(k)
                k += 1
            if socket.poll(1000):
                reply = msgpack.unpackb(socket.recv(), raw=False)
                if not reply.get("ok") or reply.get("id") not in in_flight:
                    wrong.append(reply)
                in_flight.discard(reply.get("id"))
                counts[n] += 1
            elif stop.is_set():
                break
        socket.close(0)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    print(f"soak: {clients} clients for {seconds:.0f} s, 4 domains, {clients * 500:,} stream names, --max-streams 1000")
    for t in threads:
        t.start()
    time.sleep(min(5.0, seconds / 4))  # past start-up: every domain exists, the stream table is full
    start, rss0, handled0 = time.monotonic(), rss_mb(pid), sum(counts)
    print(f"  RSS at start {rss0:.1f} MB")
    next_report = start + rss_every
    while time.monotonic() - start < seconds:
        time.sleep(min(1.0, max(0.0, next_report - time.monotonic())))
        if time.monotonic() >= next_report:
            print(f"  {time.monotonic() - start:5.0f} s  RSS {rss_mb(pid):.1f} MB  {sum(counts) - handled0:,} messages", flush=True)
            next_report += rss_every
    rss1 = rss_mb(pid)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    handled = sum(counts) - handled0
    print(f"  RSS at end {rss1:.1f} MB after {handled:,} messages in {elapsed:.0f} s ({handled / elapsed:,.0f}/s): "
          f"drift {rss1 - rss0:+.1f} MB ({100 * (rss1 - rss0) / rss0:+.1f} %); {len(wrong)} wrong replies")
    ctx.term()
    # (bench_memory.py is the full soak: PTB size, 16 domains, 10,000 streams)
    if wrong or rss1 - rss0 > 0.02 * rss0:
        raise SystemExit(f"soak failed: {len(wrong)} wrong replies (first: {wrong[:1]}), RSS drift "
                         f"{100 * (rss1 - rss0) / rss0:+.1f} % (bound +2 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file (default: the bundled model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--messages", type=int, default=1000, help="per client")
    parser.add_argument("--window", type=int, default=8, help="requests in flight per client")
    parser.add_argument("--soak-seconds", type=float, default=180.0, help="0 skips the soak")
    parser.add_argument("--soak-clients", type=int, default=4)
    parser.add_argument("--rss-every", type=float, default=30.0)
    args = parser.parse_args()
    lines = read_lines(SAMPLE)
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--max-streams", "1000"] + (["--model", args.model] if args.model else [])
        proc, ports = start_daemon(Path(tmp), extra)
        try:
            print(f"daemon pid {proc.pid}, model {args.model or 'bundled default'}, RSS {rss_mb(proc.pid):.1f} MB after start")
            warm_up(ports["endpoint"], lines)
            load(ports["endpoint"], ports["metrics"], lines, args.clients, args.messages, args.window)
            if args.soak_seconds > 0:
                soak(ports["endpoint"], proc.pid, lines, args.soak_clients, args.soak_seconds, args.rss_every)
        finally:
            proc.terminate()
            code = proc.wait(60)
        print(f"daemon stopped with status {code}")


if __name__ == "__main__":
    main()
