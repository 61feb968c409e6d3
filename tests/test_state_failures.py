"""Writing state never stops serving: a full file system, a read-only one, SIGKILL while failing.

The state directory is a real tmpfs mount (CI runs as root), filled up with a real file or
remounted read-only; the daemon is a real process and every reply is checked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import zmq

from rnnlm.clients.client import Client, DaemonError
from tests.daemon_helpers import Daemon
from tests.test_model import toy_text

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root (CI runs as root)")


@contextmanager
def tmpfs(path: Path, size: str = "512k"):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the file system, then free `leave` bytes (a write then fails part way)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


def pipelined_scores(endpoint: str, count: int, save_at: int | None = None) -> list[dict]:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    lines = toy_text(count, seed=3)
    try:
        for i in range(count):
            request = {"op": "save", "id": i} if i == save_at else {"op": "score", "id": i, "stream": "s", "text": lines[i]}
            socket.send(msgpack.packb(request))
        replies = []
        for _ in range(count):
            assert socket.poll(20_000), f"no reply after {len(replies)}"
            replies.append(msgpack.unpackb(socket.recv(), raw=False))
        return replies
    finally:
        socket.close()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " ERROR " in line]


def test_a_full_disk_is_reported_counted_and_retried_and_the_daemon_goes_on(tmp_path):
    # The bundled model: its ~10 MB checkpoint fails inside torch.save, which raises a RuntimeError
    # wrapping the OSError (the daemon once caught OSError only, and died).
    with tmpfs(tmp_path / "state", "24m") as state, Daemon(tmp_path, None, "--checkpoint-tokens", "30",
                                                           state_dir=state) as d:
        with Client(d.endpoint) as c:
            c.score("the cat sees a dog", stream="s")
            first = Path(c.save()["path"])
        filler = fill(state, leave=2 << 20)
        replies = pipelined_scores(d.endpoint, 20, save_at=10)
        assert d.proc.poll() is None, d.output()
        assert [r["ok"] for r in replies] == [i != 10 for i in range(20)], "every score answered"
        assert replies[10]["error"]["code"] == "checkpoint_failed", replies[10]
        assert "No space left on device" in replies[10]["error"]["message"]
        assert d.proc.poll() is None, d.output()
        failed = d.metric("rnnlm_checkpoints_total", outcome="failed")
        assert failed >= 1
        assert first.exists() and not list(state.glob(".state-*.tmp")), "the older checkpoint stays, no temporary file"
        errors = error_lines(d.output())
        assert len(errors) == 1 and "No space left on device" in errors[0], errors  # logged once
        assert "Traceback" not in d.output()

        filler.unlink()  # space again: the next try (after its pause) succeeds, with no request needed
        ok_before = d.metric("rnnlm_checkpoints_total", outcome="ok")
        deadline = time.monotonic() + 20
        with Client(d.endpoint) as c:
            while d.metric("rnnlm_checkpoints_total", outcome="ok") == ok_before and time.monotonic() < deadline:
                c.ping()
                time.sleep(0.2)
        assert d.metric("rnnlm_checkpoints_total", outcome="ok") > ok_before
        assert "checkpoints are written again" in d.output()
        print(f"disk full: {int(failed)} failed write(s), every reply sent, one log line; "
              f"first checkpoint kept: {first.name}")
        assert d.stop() == 0, d.output()


def test_a_read_only_state_dir_is_retried_with_a_pause_not_per_message(tmp_path, model_path):
    with tmpfs(tmp_path / "state") as state, Daemon(tmp_path, model_path, "--checkpoint-tokens", "5",
                                                    state_dir=state) as d:
        with Client(d.endpoint) as c:
            c.score("the cat", stream="s")
            first = Path(c.save()["path"])
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        start = time.monotonic()
        with Client(d.endpoint) as c:
            messages = 0
            while time.monotonic() - start < 4.0:  # every message makes a checkpoint due (5 tokens)
                c.score("the cat sees a dog", stream="s")
                messages += 1
        seconds = time.monotonic() - start
        errors = error_lines(d.output())
        assert len(errors) == 1 and "Read-only file system" in errors[0], (len(errors), errors[:3])
        attempts = d.metric("rnnlm_checkpoints_total", outcome="failed")
        print(f"read-only state dir: {int(attempts)} write attempts in {seconds:.1f} s and {messages} messages")
        # Pauses of 1, 2, 4 s after each failure: at most 3 tries in 4 s (one per message before).
        assert 1 <= attempts <= 4 and messages > 20
        assert first.exists()
        subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
        assert d.stop() == 0, d.output()


def test_sigkill_while_writes_fail_then_a_restart_resumes_the_older_checkpoint(tmp_path, model_path):
    with tmpfs(tmp_path / "state") as state:
        with Daemon(tmp_path, model_path, "--checkpoint-tokens", "5", state_dir=state) as d:
            with Client(d.endpoint) as c:
                c.score("the cat sees a dog", stream="s")
                first = Path(c.save()["path"])
                updates = c.stats()["domains"]["default"]["updates"]
                kept = sorted(p.name for p in state.glob("state-*.pt"))
                filler = fill(state)
                for line in toy_text(50, seed=4):
                    c.score(line, stream="s")
                with pytest.raises(DaemonError, match="checkpoint_failed"):
                    c.save()
            d.proc.send_signal(signal.SIGKILL)
            assert d.proc.wait(10) == -9
        filler.unlink()
        assert sorted(p.name for p in state.glob("state-*.pt")) == kept
        with Daemon(tmp_path, model_path, state_dir=state) as d, Client(d.endpoint) as c:
            assert f"resumed from {first}" in d.output()
            assert c.stats()["domains"]["default"]["updates"] == updates
            assert d.stop() == 0
