"""A real `rnnlm serve` process for the benchmarks: started on free ports, measured from /proc."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def start_daemon(workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, dict]:
    """Start the daemon with `extra` options; returns the process and its port file's endpoints."""
    ports = workdir / "ports.json"
    proc = subprocess.Popen([sys.executable, "-m", "rnnlm.cli", "serve", "--bind", "tcp://127.0.0.1:0",
                             "--metrics-addr", "127.0.0.1:0", "--port-file", str(ports), *extra],
                            stderr=open(workdir / "daemon.log", "w"))
    while not ports.exists():
        if proc.poll() is not None:
            raise SystemExit((workdir / "daemon.log").read_text())
        time.sleep(0.05)
    return proc, json.loads(ports.read_text())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
