"""The Python clients against one live daemon: messages per second, one at a time and in flight.

    .venv/bin/python bench/bench_clients.py [--messages 2000]

Starts `rnnlm serve` (bundled model, learning) on loopback and sends the same lines of
rnnlm/data/sample.txt, each as one score message on a stream of its own per case:
  sync            Client.score, one request at a time
  sync, numbered  Client(retries=3).score: each message carries `seq` (exactly-once retries)
  pipeline        Client.pipeline, 64 in flight
  async           AsyncClient shared by 64 coroutines, each scoring its own stream
Ratios between cases are measured in one run; print `uptime` beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rnnlm.bundled import SAMPLE_TEXT
from rnnlm.clients.async_client import AsyncClient
from rnnlm.clients.client import Client


def start_daemon(tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "ports.json"
    proc = subprocess.Popen([sys.executable, "-m", "rnnlm.cli", "serve", "--bind", "tcp://127.0.0.1:0",
                             "--metrics-addr", "127.0.0.1:0", "--port-file", str(port_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not port_file.exists():
        if proc.poll() is not None:
            raise SystemExit("the daemon did not start")
        time.sleep(0.05)
    return proc, json.loads(port_file.read_text())["endpoint"]


def timed(label: str, lines: list[str], run) -> None:
    start = time.perf_counter()
    replies = run()
    seconds = time.perf_counter() - start
    assert len(replies) == len(lines) and all(r["ok"] for r in replies)
    words = sum(r["tokens"] for r in replies)
    print(f"  {label:16s} {len(lines) / seconds:9,.0f} messages/s  {words / seconds:9,.0f} tokens/s  ({seconds:.2f} s)")


async def concurrent(endpoint: str, lines: list[str], coroutines: int) -> list[dict]:
    async with AsyncClient(endpoint) as c:
        async def worker(k: int) -> list[dict]:
            return [await c.score(line, stream=f"async-{k}") for line in lines[k::coroutines]]
        return [r for part in await asyncio.gather(*(worker(k) for k in range(coroutines))) for r in part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    text = [line for line in SAMPLE_TEXT.read_text().splitlines() if line.strip()]
    lines = (text * (args.messages // len(text) + 1))[:args.messages]
    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint = start_daemon(Path(tmp))
        try:
            with Client(endpoint) as warm:
                list(warm.pipeline({"op": "score", "stream": "warm-up", "text": line, "learn": False} for line in text[:200]))
            print(f"{len(lines):,} score messages ({sum(len(l.split()) + 1 for l in lines):,} tokens), learning")
            with Client(endpoint) as c:
                timed("sync", lines, lambda: [c.score(line, stream="sync") for line in lines])
            with Client(endpoint, retries=3) as c:
                timed("sync, numbered", lines, lambda: [c.score(line, stream="numbered") for line in lines])
            with Client(endpoint) as c:
                timed("pipeline (64)", lines, lambda: list(c.pipeline(
                    ({"op": "score", "stream": "pipe", "text": line} for line in lines), window=64)))
            timed("async (64)", lines, lambda: asyncio.run(concurrent(endpoint, lines, 64)))
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
