"""The multi-frame attack: RSS of the daemon while a DEALER sends messages of many big frames.

    .venv/bin/python bench/bench_frames.py [--messages 10] [--frames 100] [--frame-bytes 2000000]

Each message is --frames frames of --frame-bytes (under ZeroMQ's per-frame cap at the default
--max-message-bytes) plus a ping; all are sent before any reply is read. Printed: RSS idle, the
peak (sampled every 5 ms) and after, and the replies' frame counts and sizes.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import zmq

from daemon_process import rss_mb, start_daemon


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--frame-bytes", type=int, default=2_000_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-frames-"))
    proc, ports = start_daemon(work, [])
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(ports["endpoint"])
    socket.send(msgpack.packb({"op": "ping"}))
    socket.recv()
    time.sleep(0.5)
    idle = rss_mb(proc.pid)
    peak, running = [idle], True

    def sample():
        while running:
            peak[0] = max(peak[0], rss_mb(proc.pid))
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    junk, ping = b"x" * args.frame_bytes, msgpack.packb({"op": "ping", "id": 1})
    for _ in range(args.messages):
        socket.send_multipart([junk] * args.frames + [ping])
    replies = []
    for _ in range(args.messages):
        if not socket.poll(120_000):
            break
        replies.append(socket.recv_multipart())
    time.sleep(1.0)
    after = rss_mb(proc.pid)
    running = False
    thread.join()
    proc.terminate()
    proc.wait()
    size = args.frames * args.frame_bytes / 2 ** 20
    print(f"{args.messages} messages of {args.frames} x {args.frame_bytes:,} bytes ({size:.0f} MiB each): RSS idle "
          f"{idle:.0f} MB, peak {peak[0]:.0f} MB (+{peak[0] - idle:.0f}), 1 s after the last reply {after:.0f} MB "
          f"(+{after - idle:.0f}); {len(replies)} replies of {sorted({len(r) for r in replies})} frames, "
          f"{sum(len(f) for r in replies for f in r) / 2 ** 20:.1f} MiB in all")


if __name__ == "__main__":
    main()
