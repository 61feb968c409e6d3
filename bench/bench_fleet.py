"""A fleet of daemons: two members against one, a PTB-size domain handed over, what routing costs.

    .venv/bin/python bench/bench_fleet.py [--model runs/bench-ptb200.pt] [--lines 1000] [--moves 20]

Without --model, an untrained PTB-sized model (the PTB vocabulary, H=200, 100 classes) is made: its
online step and its weights (16 MB a domain) cost what a trained one's do. Messages are lines of PTB
test (~22 words). In one run:

1. throughput: four domains, two owned by each member of a two-member fleet; one pipelining client
   per domain (window 64, threads of this process), all starting at the first member and following
   its redirects. Words/s end to end with a fleet of one member, then of two; each member runs
   --workers 1, standing for a one-core machine.
2. handoff: one domain adapted on --lines messages, then moved between two members --moves times
   (the fleet file rewritten, both members sent SIGHUP), while a client streams the domain's
   messages one at a time, numbered (exactly-once). Per move: the longest a message waited (its
   latency, less the median latency). At the end, the domain's `updates` must equal the tokens sent:
   no message lost or learned twice.
3. routing: one daemon without --fleet, then the same daemon as the only member of a fleet; one
   client, window 64: words/s. Four runs of each, in the order ABBA ABBA; medians.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from rnnlm.clients.client import Client
from rnnlm.corpus import read_lines
from rnnlm.daemon.fleet import Fleet

from bench_workers import bench_model, through_zmq
from daemon_process import start_daemon

REPO = Path(__file__).resolve().parent.parent


def fleet_file(path: Path, members: dict[str, str]) -> Path:
    path.write_text("".join(f"{name} {endpoint}\n" for name, endpoint in members.items()))
    return path


def start_member(tmp: Path, model: Path, name: str, fleet: Path, store: Path | None, *extra: str):
    work = tmp / name
    work.mkdir(exist_ok=True)
    options = ["--model", str(model), "--bind", f"ipc://{tmp}/{name}.sock", "--fleet", str(fleet), "--fleet-name", name,
               "--workers", "1", "--max-domains", "64", *extra]
    if store is not None:
        options += ["--fleet-store", str(store)]
    return start_daemon(work, options)[0]


def stop(*procs) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(120)


def domains_split(names: list[str], per_member: int) -> list[str]:
    """Domain names owned `per_member` by each member of the fleet of `names`."""
    fleet = Fleet.parse("".join(f"{n} ipc:///{n}\n" for n in names))
    chosen = {n: [] for n in names}
    i = 0
    while any(len(v) < per_member for v in chosen.values()):
        domain = f"dom{i}"
        owner = fleet.owner(domain).name
        if len(chosen[owner]) < per_member:
            chosen[owner].append(domain)
        i += 1
    return [d for v in chosen.values() for d in v]


def throughput(tmp: Path, model: Path, lines: list[str]) -> tuple[float, float]:
    names = ["m0", "m1"]
    endpoints = {n: f"ipc://{tmp}/{n}.sock" for n in names}
    domains = domains_split(names, 2)
    results = []
    for count in (1, 2):
        path = fleet_file(tmp / f"fleet-{count}.txt", {n: endpoints[n] for n in names[:count]})
        procs = [start_member(tmp, model, n, path, None) for n in names[:count]]
        try:
            through_zmq(endpoints["m0"], lines[:30], domains, 8)  # warm up, and learn the owners
            words_per_second, _ = through_zmq(endpoints["m0"], lines, domains, 64)
        finally:
            stop(*procs)
        results.append(words_per_second)
        print(f"throughput, {count} member(s), {len(domains)} domains: {words_per_second:,.0f} words/s  "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    return results[0], results[1]


class Streamer(threading.Thread):
    """One domain's messages, one at a time and numbered, until told to stop; every latency kept."""

    def __init__(self, endpoint: str, domain: str, lines: list[str]):
        super().__init__(daemon=True)
        self.endpoint, self.domain, self.lines = endpoint, domain, lines
        self.sent_at: list[float] = []
        self.latency: list[float] = []
        self.tokens = 0
        self.last_reply: dict = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        with Client(self.endpoint, timeout=60, retries=3) as client:
            i = 0
            while not self.stopping.is_set():
                start = time.perf_counter()
                reply = client.score(self.lines[i % len(self.lines)], domain=self.domain, stream="s")
                self.sent_at.append(start)
                self.latency.append(time.perf_counter() - start)
                self.tokens += reply["tokens"]
                self.last_reply = reply
                i += 1


def handoff(tmp: Path, model: Path, lines: list[str], moves: int) -> dict:
    names = ["h0", "h1"]
    endpoints = {n: f"ipc://{tmp}/{n}.sock" for n in names}
    both = {n: endpoints[n] for n in names}
    domain = next(d for d in (f"big{i}" for i in range(100)) if Fleet.parse(
        "".join(f"{n} {e}\n" for n, e in both.items())).owner(d).name == "h1")
    store = tmp / "store"
    path = fleet_file(tmp / "fleet-h.txt", both)
    procs = [start_member(tmp, model, n, path, store, "--checkpoint-tokens", "100000000") for n in names]
    streamer = Streamer(endpoints["h0"], domain, lines)
    try:
        with Client(endpoints["h0"], timeout=120) as client:  # adapt the domain first
            list(client.pipeline({"op": "score", "domain": domain, "stream": "warm", "text": line} for line in lines))
        streamer.start()
        time.sleep(2)
        move_times = []
        for move in range(moves):
            fleet_file(path, {"h0": endpoints["h0"]} if move % 2 == 0 else both)  # h1 leaves, then joins again
            move_times.append(time.perf_counter())
            for proc in procs:
                proc.send_signal(signal.SIGHUP)
            time.sleep(1.5)
        time.sleep(1)
        streamer.stopping.set()
        streamer.join(120)
        with Client(endpoints["h0"], timeout=60) as client:
            owner_stats = client.request("score", domain=domain, stream="probe", text=lines[0], learn=False)
    finally:
        stop(*procs)
    latency = np.array(streamer.latency)
    sent = np.array(streamer.sent_at)
    typical = float(np.median(latency))
    waits = []
    for at in move_times:
        around = (sent >= at - 0.5) & (sent < at + 1.4)
        waits.append(float(latency[around].max() - typical) if around.any() else float("nan"))
    warm_tokens = sum(len(line.split()) + 1 for line in lines)
    return {"waits": np.array(waits), "typical": typical, "messages": len(latency),
            "updates": owner_stats["updates"], "tokens": warm_tokens + streamer.tokens}


def routing(tmp: Path, model: Path, lines: list[str]) -> tuple[float, float]:
    path = fleet_file(tmp / "fleet-r.txt", {"r0": f"ipc://{tmp}/r0.sock"})
    figures = {"plain": [], "fleet": []}
    for _ in range(2):
        for kind in ("plain", "fleet", "fleet", "plain"):  # ABBA: a drift in the machine's speed cancels out
            extra = ["--fleet", str(path), "--fleet-name", "r0"] if kind == "fleet" else []
            work = tmp / f"route-{kind}-{len(figures[kind])}"
            work.mkdir()
            proc, _ = start_daemon(work, ["--model", str(model), "--bind", f"ipc://{tmp}/r0.sock", "--workers", "1",
                                          *extra])
            try:
                through_zmq(f"ipc://{tmp}/r0.sock", lines[:30], ["warm"], 8)
                words_per_second, _ = through_zmq(f"ipc://{tmp}/r0.sock", lines, ["r"], 64)
            finally:
                stop(proc)
            figures[kind].append(words_per_second)
            print(f"routing, {kind}: {words_per_second:,.0f} words/s  load {os.getloadavg()[0]:.2f}", flush=True)
    return statistics.median(figures["plain"]), statistics.median(figures["fleet"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model file (default: an untrained PTB-sized model)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ptb"))
    parser.add_argument("--lines", type=int, default=1000, help="messages (PTB test lines) per domain")
    parser.add_argument("--moves", type=int, default=20, help="handoffs of the PTB-size domain")
    parser.add_argument("--only", choices=["throughput", "handoff", "routing"], default=None)
    args = parser.parse_args()
    lines = read_lines(Path(args.data) / "ptb.test.txt")[: args.lines]
    print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {len(os.sched_getaffinity(0))} cores; "
          f"{len(lines)} messages per domain", flush=True)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model, model_file = bench_model(args.model, Path(args.data), tmp)
        print(f"model: {args.model or 'untrained, PTB vocabulary'}, H={model.config.hidden}, "
              f"{model.vocab.num_classes} classes; a domain's weights {sum(a.nbytes for a in model.weights.arrays().values()) / 2 ** 20:.1f} MB", flush=True)
        rows = []
        if args.only in (None, "throughput"):
            one, two = throughput(tmp, model_file, lines)
            rows.append(("2 members vs 1, 4 domains, end-to-end words/s", f"{one:,.0f} → {two:,.0f}: {two / one:.2f}×", "≥ 1.6×"))
        if args.only in (None, "handoff"):
            h = handoff(tmp, model_file, lines, args.moves)
            w = h["waits"] * 1000
            print(f"handoff: {len(w)} moves, {h['messages']} messages streamed, median latency {h['typical'] * 1000:.1f} ms; "
                  f"wait per move (ms): {', '.join(f'{x:.0f}' for x in w)}", flush=True)
            rows.append(("handoff of one PTB-size domain, its messages' wait", f"p50 {np.percentile(w, 50):.0f} ms, "
                         f"p99 {np.percentile(w, 99):.0f} ms, max {w.max():.0f} ms over {len(w)} moves", "p99 ≤ 1 s"))
            rows.append(("updates applied vs tokens sent (lost or twice)", f"{h['updates']:,} vs {h['tokens']:,}: "
                         f"{h['tokens'] - h['updates']:+,}", "0"))
        if args.only in (None, "routing"):
            plain, fleet = routing(tmp, model_file, lines)
            rows.append(("routing overhead, one member vs no fleet, words/s", f"{plain:,.0f} → {fleet:,.0f}: "
                         f"{100 * (1 - fleet / plain):+.1f} %", "≤ 3 %"))
    print("\n| measure | measured | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nload after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
