"""The daemon's state file: its format, the snapshot, writing it off the main loop, rotation and resume.

A checkpoint is the learner's state as it stood between two messages (a `Snapshot`), written by
a background thread (`begin`), so the main loop goes on serving while the bytes go to disk. The
main thread copies only the domains' counters and tallies at once; the domains' weights (16 MB
each at PTB size) and the streams (state, tally, seq: 10,000 of them take tens of milliseconds)
are copied by the writer, a few at a time, except that a domain and stream about to change are
copied first by the thread changing them (copy before write), so the file is still that one
moment's state. At most one write is in
flight; `write_now` (the `save` op, shutdown) waits for it first.

Writing never stops the daemon. Whatever a write raises (ENOSPC, EROFS, EIO, or torch's
RuntimeError wrapping one of them) is counted in rnnlm_checkpoints_total{outcome="failed"}, logged
once per run of failures (and once more when writing works again), and retried with a growing
pause instead of after every message. A failed write leaves no file behind, and the older
checkpoints are kept: they are rotated away only after a new one is complete.

Resume reads the newest checkpoint that passes every check (rnnlm.checkpoint validates the model,
learner.restore the domains and streams); any error reading or checking a file skips it for the
one before.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rnnlm.checkpoint import VERSION, CheckpointError, read_checked, stacked_stream_states, write_atomic

from .learner import STATE_FORMAT, Learner, base_model_of
from .workers import lower_priority_of_this_thread

log = logging.getLogger("rnnlm.daemon")

RETRY_FIRST_SECONDS = 1.0  # pause after a first failed write; it doubles with each failure after it
RETRY_MAX_SECONDS = 300.0
WRITER_NICE = 10

__all__ = ["STATE_FORMAT", "StateStore", "CheckpointWriteError"]


class CheckpointWriteError(Exception):
    """A checkpoint could not be written; the message says why (e.g. no space left on device)."""


class Snapshot:
    """The learner's state at one moment. Domains' weights and streams' states are copied lazily:
    by the writer thread, or by the main thread just before one of them changes."""

    def __init__(self, learner: Learner):
        self.learner = learner
        self.payload = {"format": STATE_FORMAT, "version": VERSION,
                        **learner.to_payload(copy=True, domain_weights=False, stream_states=False)}
        self.domains = dict(learner.domains)  # name -> Domain whose weights are not copied yet
        streams = list(learner.streams.items())  # in the payload's order
        self.streams = {key: (i, stream) for i, (key, stream) in enumerate(streams)}  # not copied yet
        self.states = [None] * len(streams)  # the copies, by row
        self.entries = [None] * len(streams)  # each stream's tally, seq and mixture parts, by row
        self.lock = threading.Lock()  # held while copying: nothing is changed while it is being copied
        learner.before_learning = self.before_learning

    def before_learning(self, domain: str, stream: tuple[str, str]) -> None:
        """The main thread is about to change this domain and stream: copy them first if not done yet."""
        with self.lock:
            self._copy_domain(domain)
            self._copy_stream(stream)

    def _copy_domain(self, name: str) -> None:
        domain = self.domains.pop(name, None)
        if domain is not None:
            self.payload["domains"][name].update(self.learner.weights_payload(domain, copy=True))

    def _copy_stream(self, key: tuple[str, str]) -> None:
        entry = self.streams.pop(key, None)
        if entry is not None:
            row, stream = entry
            self.states[row] = stream.state.copy()
            self.entries[row] = self.learner.stream_entry(key, stream, copy=True)

    def complete(self) -> dict:
        """The whole payload (writer thread): copy what is not copied yet, a little at a time."""
        for name in list(self.domains):
            with self.lock:
                self._copy_domain(name)
        keys = list(self.streams)
        for lo in range(0, len(keys), STREAMS_PER_LOCK):
            with self.lock:
                for key in keys[lo:lo + STREAMS_PER_LOCK]:
                    self._copy_stream(key)
        self.payload["streams"] = self.entries
        self.payload["stream_states"] = stacked_stream_states(self.states, self.learner.model.new_state(self.learner.rule))
        return self.payload

    def drop(self) -> None:
        with self.lock:
            self.payload, self.states, self.entries, self.domains, self.streams = {}, [], [], {}, {}

    def release(self) -> None:
        if self.learner.before_learning == self.before_learning:
            self.learner.before_learning = None


STREAMS_PER_LOCK = 500  # the main thread waits at most this many stream copies (~1 ms)


@dataclass
class Write:
    path: Path
    why: str
    started: float
    snapshot_seconds: float  # the part spent on the main thread, copying the state
    snapshot: Snapshot
    thread: threading.Thread | None = None
    error: BaseException | None = None


class StateStore:
    def __init__(self, directory: str | Path, keep: int, counted: Callable[[bool], None]):
        self.directory = Path(directory)
        self.keep = keep
        self.counted = counted  # called with True/False after each write (the checkpoint metrics)
        self.seq = 0  # number of the last file name used; a damaged file's name is never reused
        self.in_flight: Write | None = None
        self.failures = 0  # consecutive failed writes
        self.retry_at = 0.0  # monotonic time before which a scheduled checkpoint is not tried again
        self.last_path: Path | None = None  # the newest complete checkpoint written by this process
        self.last_error = ""  # why the last write failed

    # --- files ---------------------------------------------------------------------------------

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("state-*.pt"))

    def remove_temporary_files(self) -> None:
        """A checkpoint being written when the process was killed leaves its temporary file."""
        for tmp in self.directory.glob(".state-*.tmp"):
            log.info("removing %s, left by an interrupted checkpoint", tmp)
            tmp.unlink(missing_ok=True)

    # --- resume --------------------------------------------------------------------------------

    def resume(self, new_learner: Callable, accept: Callable[[dict, Path, object], None]) -> Learner | None:
        """The learner of the newest usable checkpoint, None when there is none at all.

        `new_learner(model)` builds a learner on a checkpoint's base model; `accept(payload, path,
        model)` raises CheckpointError when the file is valid but belongs to another set-up (that
        stops the start, as a file to skip would silently lose its state). Any error reading or
        checking a file skips it. If there are files and none can be used, the daemon refuses to
        start rather than forget (and later rotate away) the state they hold."""
        self.remove_temporary_files()
        files = self.files()
        if files:
            self.seq = int(files[-1].stem.split("-")[-1])
        for path in reversed(files):
            try:
                payload = read_checked(path, STATE_FORMAT)
                model = base_model_of(payload, str(path))
            except Exception as err:  # every loader error: skip this file
                log.warning("skipping %s", reason_of(err, path))
                continue
            accept(payload, path, model)
            learner = new_learner(model)
            try:
                learner.restore(payload, str(path))
            except Exception as err:
                log.warning("skipping %s", reason_of(err, path))
                continue
            log.info("resumed from %s: %d domain(s), %d stream(s)", path, len(learner.domains), len(learner.streams))
            return learner
        if files:
            raise CheckpointError(f"{self.directory}: none of its {len(files)} checkpoint file(s) can be used (see "
                                  "the warnings above); move them away to start afresh from the model")
        return None

    # --- writing -------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.in_flight is not None

    def may_retry(self) -> bool:
        return time.monotonic() >= self.retry_at

    def begin(self, learner: Learner, why: str) -> None:
        """Snapshot the learner now and write the snapshot in a background thread."""
        assert self.in_flight is None, "one write at a time"
        started = time.perf_counter()
        snapshot = Snapshot(learner)
        self.seq += 1
        path = self.directory / f"state-{self.seq:08d}.pt"
        write = Write(path, why, started, time.perf_counter() - started, snapshot)
        write.thread = threading.Thread(target=self._write, args=(write,), name="checkpoint", daemon=True)
        self.in_flight = write
        write.thread.start()

    def _write(self, write: Write) -> None:
        lower_priority_of_this_thread(WRITER_NICE)  # on a busy machine serving and learning come first
        try:
            write_atomic(write.path, write.snapshot.complete())
        except BaseException as err:  # anything: the main thread reports it
            write.error = err
        finally:
            write.snapshot.drop()  # hundreds of MB given back here, not in the main thread
        if write.error is None:
            self._rotate()

    def _rotate(self) -> None:
        """Remove all but the newest `keep` files, once a new one is complete. In the writer
        thread: freeing a file of hundreds of MB takes the file system tens of milliseconds."""
        for old in self.files()[:-self.keep]:
            old.unlink(missing_ok=True)

    def poll(self) -> Path | None | bool:
        """Finish the write in flight if it is done: its path, None if it failed, False if none finished."""
        if self.in_flight is None or self.in_flight.thread.is_alive():
            return False
        return self.finish()

    def finish(self) -> Path | None:
        """Wait for the write in flight; its path, or None when it failed (counted and logged)."""
        write, self.in_flight = self.in_flight, None
        write.thread.join()
        write.snapshot.release()
        if write.error is not None:
            self._failed(write)
            return None
        self.counted(True)
        if self.failures:
            log.info("checkpoints are written again, after %d failed attempt(s)", self.failures)
        self.failures, self.retry_at, self.last_path = 0, 0.0, write.path
        log.info("checkpoint %s (%s, %.0f ms, of which %.0f ms taking the snapshot)", write.path, write.why,
                 1000 * (time.perf_counter() - write.started), 1000 * write.snapshot_seconds)
        return write.path

    def _failed(self, write: Write) -> None:
        self.counted(False)
        self.failures += 1
        pause = min(RETRY_FIRST_SECONDS * 2 ** (self.failures - 1), RETRY_MAX_SECONDS)
        self.retry_at = time.monotonic() + pause
        reason = reason_of(write.error)
        if self.failures == 1:  # once per run of failures: a full disk must not flood the log
            log.error("checkpoint %s (%s) failed: %s; the daemon goes on serving, keeps the older checkpoints "
                      "and tries again, waiting longer after each failure (up to %.0f s)",
                      write.path, write.why, reason, RETRY_MAX_SECONDS)
        else:
            log.debug("checkpoint failed again (%d in a row): %s; next try in %.0f s", self.failures, reason, pause)
        self.last_error = reason

    def write_now(self, learner: Learner, why: str) -> Path:
        """Write a checkpoint and wait for it (after the one in flight); CheckpointWriteError if it fails."""
        if self.in_flight is not None:
            self.finish()
        self.begin(learner, why)
        path = self.finish()
        if path is None:
            raise CheckpointWriteError(self.last_error)
        return path


def reason_of(err: BaseException, path: Path | None = None) -> str:
    """One line saying why: the OSError torch wraps in a RuntimeError, when there is one."""
    if isinstance(err, CheckpointError):
        return str(err)
    cause = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        text = cause.strerror or str(cause)
    else:
        lines = str(err).strip().splitlines()
        text = f"{type(err).__name__}: {lines[0][:200] if lines else ''}"
    return f"{path}: {text}" if path is not None else text
