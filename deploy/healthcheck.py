#!/usr/bin/env python3
"""Exit 0 if the rnnlm daemon answers a `ping` on its request socket in time, else 1.

Used by the container's HEALTHCHECK and the Kubernetes liveness/readiness probes. A ping goes
through the daemon's main loop, the one thread that scores text, so an answer means the daemon
is serving, where the /metrics endpoint (its own thread) would answer even with the loop stuck.
Needs only pyzmq and msgpack, which the daemon installs anyway.

    python healthcheck.py [--endpoint tcp://127.0.0.1:5555] [--timeout 5]
"""

import argparse
import sys

import msgpack
import zmq


def ping(endpoint: str, timeout: float) -> bool:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"v": 1, "op": "ping", "id": "healthcheck"}))
        if not sock.poll(int(timeout * 1000)):
            return False
        reply = msgpack.unpackb(sock.recv(), raw=False)
        return isinstance(reply, dict) and reply.get("pong") is True
    except (zmq.ZMQError, ValueError):
        return False
    finally:
        sock.close()
        ctx.term()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    args = parser.parse_args()
    ok = ping(args.endpoint, args.timeout)
    if not ok:
        print(f"no answer to ping from {args.endpoint} within {args.timeout:g} s", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
