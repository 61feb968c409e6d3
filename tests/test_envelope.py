"""A message is one request frame behind at most ROUTER's identity and an empty delimiter.

The review's attack: one DEALER message of 100 frames of 2,000,000 bytes (each under ZeroMQ's
per-frame cap) plus a ping. Every frame but the last used to be echoed back as "envelope", and the
daemon's RSS grew by hundreds of MB per message. Now the extra frames are read and dropped one by
one, the reply is one `bad_request` frame, and RSS stays near its idle value.
"""

from __future__ import annotations

import threading
import time

import msgpack
import zmq

from tests.daemon_helpers import Daemon

FRAMES, FRAME_BYTES = 100, 2_000_000


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """The highest RSS of a process, sampled every 5 ms while in the `with` block."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.running = pid, 0.0, True

    def __enter__(self):
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def test_many_frames_get_one_bad_request_frame_and_rss_stays_near_idle(tmp_path, model_path):
    with Daemon(tmp_path, model_path) as d:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(d.endpoint)
        socket.send(msgpack.packb({"op": "ping", "id": 0}))
        assert socket.poll(10_000)
        socket.recv()
        time.sleep(0.5)
        idle = rss_mb(d.proc.pid)
        junk = b"x" * FRAME_BYTES
        ping = msgpack.packb({"op": "ping", "id": 1})
        with PeakRss(d.proc.pid) as rss:
            for _ in range(10):  # ten such messages, sent without reading the replies
                socket.send_multipart([junk] * FRAMES + [ping])
            replies = []
            for _ in range(10):
                assert socket.poll(60_000), "no reply"
                replies.append(socket.recv_multipart())
        assert all(len(r) == 1 for r in replies), [len(r) for r in replies]
        reply = msgpack.unpackb(replies[0][0], raw=False)
        assert reply["error"]["code"] == "bad_request" and reply["id"] is None, reply
        socket.send(msgpack.packb({"op": "ping", "id": 2}))
        assert socket.poll(10_000) and msgpack.unpackb(socket.recv(), raw=False)["pong"]
        time.sleep(0.5)
        after = rss_mb(d.proc.pid)
        one_message = FRAMES * FRAME_BYTES / 2 ** 20
        print(f"10 messages of {FRAMES} x {FRAME_BYTES:,} bytes ({one_message:.0f} MB each): RSS idle {idle:.0f} MB, "
              f"peak {rss.peak:.0f} MB (+{rss.peak - idle:.0f} MB), after {after:.0f} MB (+{after - idle:.0f} MB); "
              f"each answered with one {len(replies[0][0])}-byte frame")
        assert after - idle <= 50, (idle, after)
        assert rss.peak - idle <= 2 * one_message + 50, (idle, rss.peak)
        socket.close()
        assert d.stop() == 0
