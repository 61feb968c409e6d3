"""The daemon's memory at PTB size: per-unit costs, the budget, and a soak that must not drift.

    .venv/bin/python bench/bench_memory.py [--rounds 6] [--domains 16] [--streams 10000]

The model is untrained with the real PTB sizes (bench_checkpoint.ptb_size_model: the PTB
vocabulary, H=200, 100 classes). Measured from /proc: RSS idle, after one message in each of
--domains domains (the cost of a domain), after one message in each of --streams streams (the
cost of a stream). Then the soak: --rounds rounds, each sending one message to every stream
(spread over the domains) with 100 in flight, checking every reply (ok, the right id, the right
token count), with a checkpoint written every 20 s meanwhile; RSS after each round. It fails
(exit 1) if any reply is wrong or RSS after the last round is more than 2 % above the first.
Then --max-memory-mb is checked live: a budget with room for 4 domains refuses the 5th.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zmq

from bench_checkpoint import ptb_size_model
from daemon_process import rss_mb, start_daemon

LINE = "the market fell as investors sold shares".split()


def send_all(socket, requests: list[dict], window: int = 100) -> int:
    """Pipeline the requests, check every reply; returns the number of replies."""
    expected = {}
    sent = got = 0
    while got < len(requests):
        while sent < len(requests) and sent - got < window:
            expected[requests[sent]["id"]] = len(requests[sent]["tokens"])
            socket.send(msgpack.packb(requests[sent]))
            sent += 1
        reply = msgpack.unpackb(socket.recv(), raw=False)
        want = expected.pop(reply.get("id"), None)
        if not reply.get("ok") or want is None or reply["tokens"] != want:
            raise SystemExit(f"wrong reply: {reply}")
        got += 1
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--domains", type=int, default=16)
    ap.add_argument("--streams", type=int, default=10_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    model = work / "ptb-size.pt"
    ptb_size_model(model)
    proc, ports = start_daemon(work, ["--model", str(model), "--state-dir", str(work / "state"),
                                      "--checkpoint-seconds", "20", "--max-domains", str(args.domains)])
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(ports["endpoint"])
    rid = iter(range(10 ** 9))

    def message(i: int) -> dict:
        return {"op": "score", "id": next(rid), "domain": "default" if i % args.domains == 0 else f"d{i % args.domains}",
                "stream": f"s{i}", "tokens": LINE}

    try:
        time.sleep(1)
        idle = rss_mb(proc.pid)
        send_all(socket, [message(i) for i in range(args.domains)])
        time.sleep(0.5)
        domains = rss_mb(proc.pid)
        send_all(socket, [message(i) for i in range(args.domains, args.streams)])
        time.sleep(0.5)
        full = rss_mb(proc.pid)
        per_domain = (domains - idle) / args.domains
        per_stream = (full - domains) / (args.streams - args.domains) * 1024
        print(f"RSS idle {idle:.0f} MB; {args.domains} domains {domains:.0f} MB ({per_domain:.1f} MB each); "
              f"{args.streams} streams {full:.0f} MB ({per_stream:.1f} KB each)")
        rounds = []
        start = time.monotonic()
        for r in range(args.rounds):
            replies = send_all(socket, [message(i) for i in range(args.streams)])
            rounds.append(rss_mb(proc.pid))
            print(f"soak round {r + 1}: {replies} replies checked, RSS {rounds[-1]:.0f} MB "
                  f"({time.monotonic() - start:.0f} s)")
        drift = (rounds[-1] - rounds[0]) / rounds[0]
        checkpoints = len(list((work / "state").glob("state-*.pt")))
        print(f"soak: {args.rounds} rounds of {args.streams} messages in {time.monotonic() - start:.0f} s, "
              f"RSS {rounds[0]:.0f} -> {rounds[-1]:.0f} MB (drift {100 * drift:+.2f} %), checkpoints on disk {checkpoints}")
    finally:
        socket.close(0)
        proc.terminate()
        proc.wait()
    ok = drift <= 0.02

    # The budget, live: room for about 4 domains beyond the loaded process.
    budget = idle + 4.5 * per_domain * 3 + 1000  # (per-domain worst case: weights x3; 1000 MB for messages in hand)
    (work / "budget").mkdir()
    proc, ports = start_daemon(work / "budget", ["--model", str(model), "--max-memory-mb", f"{budget:.0f}"])
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(ports["endpoint"])
    made = 0
    for i in range(16):
        socket.send(msgpack.packb({"op": "score", "id": i, "domain": f"b{i}", "stream": "s", "tokens": LINE}))
        reply = msgpack.unpackb(socket.recv(), raw=False)
        if not reply["ok"]:
            print(f"--max-memory-mb {budget:.0f}: {made} domains made, then {reply['error']['code']}: "
                  f"{reply['error']['message']}")
            ok = ok and reply["error"]["code"] == "memory_budget"
            break
        made += 1
    socket.close(0)
    proc.terminate()
    proc.wait()
    sys.exit(0 if ok and 0 < made < 16 else 1)


if __name__ == "__main__":
    main()
