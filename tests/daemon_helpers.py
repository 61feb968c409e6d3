"""Starting a real daemon process on loopback for tests, and talking to it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


from rnnlm.checkpoint import save_model
from rnnlm.model import RNNLM, Config
from rnnlm.train import train
from rnnlm.vocab import Vocabulary


def small_trained_model(path: Path, lines: list[str], hidden: int = 16, epochs: int = 4) -> Path:
    words = [w for line in lines for w in line.split() + ["</s>"]]
    split = len(words) * 9 // 10
    vocab = Vocabulary.build(words[:split], min_count=1, num_classes=4)
    model = RNNLM.create(Config(hidden=hidden, classes=4, max_epochs=epochs), vocab)
    train(model, words[:split], words[split:])
    save_model(model, path)
    return path


class Daemon:
    """`rnnlm serve` as a child process with free ports, stopped with a real signal."""

    def __init__(self, tmp: Path, model: Path | None, *extra: str, state_dir: Path | None = None):
        self.tmp = tmp
        self.port_file = tmp / f"ports-{time.monotonic_ns()}.json"
        self.state_dir = state_dir
        args = [sys.executable, "-m", "rnnlm.cli", "serve", "--bind", "tcp://127.0.0.1:0",
                "--metrics-addr", "127.0.0.1:0", "--port-file", str(self.port_file), *extra]
        if model is not None:
            args += ["--model", str(model)]
        if state_dir is not None:
            args += ["--state-dir", str(state_dir)]
        self.log = open(tmp / f"daemon-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.output()}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        self.endpoint, self.metrics_url = ports["endpoint"], ports["metrics"]
        self.pull_endpoint = ports.get("pull_endpoint")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def metric(self, name: str, **labels) -> float:
        """The value of one sample from a real scrape (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.scrape().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, label_text = key.partition("{")
            got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
            if metric == name and got == want:
                return float(value)
        return 0.0

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close() if sig == signal.SIGKILL else None

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
