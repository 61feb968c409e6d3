"""Ping latency while the daemon writes a PTB-size checkpoint of 16 domains and 10,000 streams.

    .venv/bin/python bench/bench_checkpoint.py [--seconds 30] [--checkpoint-seconds 5]

The model is untrained: the PTB vocabulary (10k words, from shared/data/ptb's training text),
H=200, 100 classes, random weights, which has the real sizes of the PTB model (weights, state
file, copy times) without hours of training. The daemon gets 16 domains and 10,000 streams, then
a trickle of score messages (so every --checkpoint-seconds a checkpoint is due) while a probe
sends a ping every 10 ms on a fixed schedule and times each answer. Printed: the checkpoints written (and how long
each took, from the daemon's log), and the pings' p50 / p99 / max, overall and for the pings sent
while a checkpoint was being taken or written.
"""

from __future__ import annotations

import argparse
import gc
import re
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import zmq

from rnnlm.checkpoint import save_model
from rnnlm.corpus import read_tokens
from rnnlm.model import RNNLM, Config
from rnnlm.vocab import Vocabulary

from daemon_process import rss_mb, start_daemon

PTB = Path("/work/shared/data/ptb/ptb.train.txt")


def ptb_size_model(path: Path) -> None:
    vocab = Vocabulary.build(read_tokens(str(PTB)), num_classes=100)
    save_model(RNNLM.create(Config(hidden=200, classes=100), vocab), path)


def fill(endpoint: str, domains: int, streams: int) -> None:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(endpoint)
    sent = 0
    for i in range(streams):
        socket.send(msgpack.packb({"op": "score", "id": i, "domain": f"d{i % domains}", "stream": f"s{i}",
                                   "text": "the market fell"}))
        sent += 1
        if sent >= 500 or i == streams - 1:
            for _ in range(sent):
                reply = msgpack.unpackb(socket.recv(), raw=False)
                assert reply["ok"], reply
            sent = 0
    socket.close()


def probe_on_a_schedule(endpoint: str, seconds: float, pid: int, every: float = 0.01) -> tuple[list, float]:
    """A ping every `every` seconds on a fixed schedule, whether or not earlier ones were answered,
    so a stall of the daemon counts once per ping it delays (no coordinated omission)."""
    probe = zmq.Context.instance().socket(zmq.DEALER)
    probe.connect(endpoint)
    sent: dict[int, tuple[float, float]] = {}
    pings, peak, seq = [], 0.0, 0
    end = time.monotonic() + seconds
    next_send = time.monotonic()
    while time.monotonic() < end or (sent and time.monotonic() < end + 30):
        now = time.monotonic()
        if now >= next_send and now < end:
            probe.send(msgpack.packb({"op": "ping", "id": seq}))
            sent[seq] = (time.time(), now)
            seq += 1
            next_send += every
            peak = max(peak, rss_mb(pid))
        while probe.poll(1):
            reply = msgpack.unpackb(probe.recv(), raw=False)
            wall, start = sent.pop(reply["id"])
            pings.append((wall, time.monotonic() - start))
    probe.close()
    return pings, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--checkpoint-seconds", type=float, default=5.0)
    ap.add_argument("--domains", type=int, default=16)
    ap.add_argument("--streams", type=int, default=10_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    model = work / "ptb-size.pt"
    ptb_size_model(model)
    proc, ports = start_daemon(work, ["--model", str(model), "--state-dir", str(work / "state"),
                                      "--checkpoint-seconds", str(args.checkpoint_seconds),
                                      "--checkpoint-tokens", "100000000"])
    try:
        fill(ports["endpoint"], args.domains, args.streams)
        print(f"filled {args.domains} domains, {args.streams} streams; RSS {rss_mb(proc.pid):.0f} MB")
        stop = threading.Event()

        def trickle():
            socket = zmq.Context.instance().socket(zmq.DEALER)
            socket.connect(ports["endpoint"])
            i = 0
            while not stop.is_set():
                socket.send(msgpack.packb({"op": "score", "id": i, "domain": "d0", "stream": "trickle",
                                           "text": "the market rose"}))
                assert msgpack.unpackb(socket.recv(), raw=False)["ok"]
                i += 1
                time.sleep(0.05)
            socket.close()

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        gc.freeze()  # this process's own collector pauses would otherwise be counted as the daemon's
        gc.disable()
        pings, peak = probe_on_a_schedule(ports["endpoint"], args.seconds, proc.pid)
        gc.enable()
        stop.set()
        thread.join()
    finally:
        proc.terminate()
        proc.wait()
    log = (work / "daemon.log").read_text()
    checkpoints = re.findall(r"^(\S+ \S+) INFO rnnlm.daemon: checkpoint \S+ \(scheduled, (\d+) ms", log, re.M)
    sizes = sorted((work / "state").glob("state-*.pt"))
    print(f"{len(checkpoints)} scheduled checkpoints in {args.seconds:.0f} s, each {sizes[-1].stat().st_size / 2 ** 20:.0f} MiB, "
          f"written in {', '.join(ms for _, ms in checkpoints)} ms; peak RSS {peak:.0f} MB")
    seconds = np.array([s for _, s in pings]) * 1000  # pings: (unix time sent, seconds to the answer)
    print(f"{len(seconds)} pings: p50 {np.percentile(seconds, 50):.1f} ms, p99 {np.percentile(seconds, 99):.1f} ms, "
          f"max {seconds.max():.1f} ms")
    # the pings sent while a checkpoint was in progress (its log line is stamped when it ends)
    from datetime import datetime
    windows = []
    for stamp, ms in checkpoints:
        done = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        windows.append((done - int(ms) / 1000, done))
    during = np.array([s for t, s in pings if any(a - 0.05 <= t <= b for a, b in windows)]) * 1000
    if len(during):
        print(f"{len(during)} pings during checkpoints: p50 {np.percentile(during, 50):.1f} ms, "
              f"p99 {np.percentile(during, 99):.1f} ms, max {during.max():.1f} ms")


if __name__ == "__main__":
    main()
