"""Parallel learners: words/s and latency with `--workers 2` against `--workers 1`.

    .venv/bin/python bench/bench_workers.py [--model runs/bench-ptb200.pt] [--data ../shared/data/ptb]

Without --model, an untrained PTB-sized model (the PTB vocabulary, H=200, 100 classes) is made:
its online step costs what a trained one's does. In one run (~2 min on 2 cores):

1. in-process (a Learner, no sockets): two domains scored by one thread, then by two threads at
   once (one domain each): the compiled step's parallelism, with nothing else around it;
2. through ZeroMQ, a real `rnnlm serve` with --workers 1, then with --workers 2, alternated
   --repeat times (medians reported), each time:
   two domains, one pipelining client each (window 64, threads of this process): words/s end to end;
   one domain, one client: words/s (a second worker must cost nothing);
   two domains, one client process each with one request in flight: per-message latency p50/p99.
Each message is one line of PTB test (~22 words); the ratios are within this run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from rnnlm.checkpoint import load_model, save_model
from rnnlm.clients.client import Client
from rnnlm.corpus import read_lines, read_tokens
from rnnlm.daemon.learner import Learner
from rnnlm.daemon.protocol import Request
from rnnlm.model import RNNLM, Config, OnlineRule
from rnnlm.vocab import Vocabulary

from daemon_process import start_daemon

REPO = Path(__file__).resolve().parent.parent


def ptb_sized_model(data: Path) -> RNNLM:
    vocab = Vocabulary.build(read_tokens(data / "ptb.train.txt"), min_count=1, num_classes=100)
    return RNNLM.create(Config(hidden=200, classes=100), vocab)


def bench_model(given: str | None, data: Path, tmp: Path) -> tuple[RNNLM, Path]:
    """The model a bench runs on, and its file: --model's, or an untrained PTB-sized one saved in tmp."""
    if given:
        return load_model(given), Path(given)
    model, path = ptb_sized_model(data), tmp / "ptb200.pt"
    save_model(model, path)
    return model, path


def in_process(model: RNNLM, lines: list[str], threads: int) -> tuple[float, float]:
    """Words/s of two domains' messages scored by one thread in turn, or by two threads at once,
    and the process's CPU seconds per wall second meanwhile (above 1: the threads ran at once,
    which a GIL held in the step would prevent, however loaded the machine)."""
    learner = Learner(model, OnlineRule(lr=0.01))
    learner.warm_up()
    work = {d: [Request("score", stream="s", domain=d, sentences=[line.split()]) for line in lines]
            for d in ("a", "b")}

    def score(requests):
        for r in requests:
            learner.score(r)

    start, cpu = time.perf_counter(), time.process_time()
    if threads == 1:
        score([r for pair in zip(work["a"], work["b"]) for r in pair])
    else:
        runners = [threading.Thread(target=score, args=(work[d],)) for d in work]
        for t in runners:
            t.start()
        for t in runners:
            t.join()
    seconds = time.perf_counter() - start
    return sum(len(r.words) for rs in work.values() for r in rs) / seconds, (time.process_time() - cpu) / seconds


def client_stream(endpoint: str, lines: list[str], domain: str, window: int, out: dict) -> None:
    sent, latencies, words = {}, [], 0
    with Client(endpoint, timeout=120) as client:
        def requests():
            for line in lines:
                sent[len(sent)] = time.perf_counter()
                yield {"op": "score", "stream": "s", "domain": domain, "text": line}

        for i, reply in enumerate(client.pipeline(requests(), window)):
            latencies.append(time.perf_counter() - sent[i])
            words += reply["tokens"]
    out[domain] = (words, np.array(latencies))


def through_zmq(endpoint: str, lines: list[str], domains: list[str], window: int) -> tuple[float, np.ndarray]:
    """Words/s of one client per domain, all at once, and every message's latency."""
    out: dict = {}
    clients = [threading.Thread(target=client_stream, args=(endpoint, lines, d, window, out)) for d in domains]
    start = time.perf_counter()
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    seconds = time.perf_counter() - start
    return sum(w for w, _ in out.values()) / seconds, np.concatenate([lat for _, lat in out.values()])


def latency_client(endpoint: str, lines: list[str], domain: str, results) -> None:
    """A client process (as real clients are): one request in flight, every message's latency."""
    out: dict = {}
    client_stream(endpoint, lines, domain, 1, out)
    results.put(out[domain][1])


def latencies_from_processes(endpoint: str, lines: list[str], domains: list[str]) -> np.ndarray:
    """One client process per domain, all at once; every message's latency. Threads of one
    process would share its GIL: replies arriving together would wait for each other there."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=latency_client, args=(endpoint, lines, d, results)) for d in domains]
    for p in procs:
        p.start()
    latency = np.concatenate([results.get() for _ in procs])
    for p in procs:
        p.join()
    return latency


def daemon_figures(model_file: Path, lines: list[str], workers: int, tmp: Path) -> dict:
    work = tmp / f"workers-{workers}"
    work.mkdir(parents=True)
    proc, ports = start_daemon(work, ["--model", str(model_file), "--workers", str(workers), "--max-domains", "64"])
    try:
        endpoint = ports["endpoint"]
        through_zmq(endpoint, lines[:50], ["warm"], 8)
        two, _ = through_zmq(endpoint, lines, ["a", "b"], 64)
        one, _ = through_zmq(endpoint, lines, ["solo"], 64)
        latency = latencies_from_processes(endpoint, lines[: len(lines) // 2], ["la", "lb"])
    finally:
        proc.terminate()
        proc.wait(60)
    return {"two": two, "one": one, "p50": np.percentile(latency, 50) * 1e3, "p99": np.percentile(latency, 99) * 1e3,
            "latency": latency}


def summary(runs: list[dict]) -> dict:
    """Medians of the runs' words/s; latency percentiles over every message of all runs together
    (a p99 of one run rests on its 20 slowest messages of 2,000, too few to compare)."""
    latency = np.concatenate([r["latency"] for r in runs])
    return {"two": float(np.median([r["two"] for r in runs])), "one": float(np.median([r["one"] for r in runs])),
            "p50": np.percentile(latency, 50) * 1e3, "p99": np.percentile(latency, 99) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model file (default: an untrained PTB-sized model)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ptb"))
    parser.add_argument("--lines", type=int, default=1000, help="messages (PTB test lines) per domain")
    parser.add_argument("--repeat", type=int, default=3, help="daemon runs per worker count, alternated; medians reported")
    args = parser.parse_args()
    data = Path(args.data)
    lines = read_lines(data / "ptb.test.txt")[: args.lines]
    print(f"load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"{len(os.sched_getaffinity(0))} cores; {len(lines)} messages per domain, "
          f"{sum(len(line.split()) + 1 for line in lines):,} words", flush=True)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model, model_file = bench_model(args.model, data, tmp)
        print(f"model: {args.model or 'untrained, PTB vocabulary'}, H={model.config.hidden}, "
              f"{model.vocab.num_classes} classes", flush=True)
        (solo, solo_cpu), (pair, pair_cpu) = in_process(model, lines, 1), in_process(model, lines, 2)
        print(f"in-process CPU seconds per wall second: one thread {solo_cpu:.2f}, two threads {pair_cpu:.2f}", flush=True)
        runs = {1: [], 2: []}
        for repeat in range(args.repeat):  # alternated, so drifting load touches both alike
            for workers in (1, 2):
                runs[workers].append(daemon_figures(model_file, lines, workers, tmp / f"r{repeat}"))
                print(f"run {repeat + 1}, --workers {workers}: " + ", ".join(
                    f"{k} {v:,.1f}" for k, v in runs[workers][-1].items() if k != "latency")
                    + f"  load {os.getloadavg()[0]:.2f}", flush=True)
        d1, d2 = (summary(runs[w]) for w in (1, 2))
    rows = [
        ("2 domains, end to end through ZeroMQ (words/s)", d1["two"], d2["two"], "≥ 1.6×"),
        ("2 domains, in-process Learner (words/s)", solo, pair, "≥ 1.8×"),
        ("1 domain, end to end (words/s)", d1["one"], d2["one"], "≥ 0.97×"),
        ("2 domains, 1 in flight per client: p50 latency (ms)", d1["p50"], d2["p50"], ""),
        ("2 domains, 1 in flight per client: p99 latency (ms)", d1["p99"], d2["p99"], "≤ 1×"),
    ]
    print(f"\nwords/s: medians of {args.repeat} runs each; latency: all runs' messages together\n| measure | 1 worker | 2 workers | 2 / 1 | target |\n|---|---|---|---|---|")
    for name, one, two, target in rows:
        print(f"| {name} | {one:,.1f} | {two:,.1f} | {two / one:.2f}× | {target} |")
    print(f"\nload after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
