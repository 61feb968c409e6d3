"""Learner threads: each applies the score messages of its domains, in the order they are handed over.

Domains are independent sets of weights, and the compiled step releases the GIL, so two domains
learn at the same time on two cores. A domain (and with it all its streams) belongs to one worker,
so its messages are applied strictly in arrival order, which keeps every reply equal to the
single-learner daemon's and to `rnnlm eval --dynamic`.

The main thread owns the sockets: it hands a worker a run of messages (`hand`), the worker scores
them and puts its answers on a queue, and wakes the main thread through an inproc socket (its
poller then sees the answers as it sees a request). A worker never touches a socket.

Assignment: a domain goes to the worker with the fewest domains when it is first seen, and stays
there while it has messages in flight. With a handful of domains (the usual case) this spreads
them evenly, where a hash of the name would put two domains on one worker half the time; the
assignment changes no number, only which core does the work, so it need not survive a restart.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import zmq

WAKE_ENDPOINT = "inproc://rnnlm-workers-done"
RUNS_QUEUED = 2  # runs handed to one worker and not yet answered: one being scored, the next one ready
# Learners run a little behind the main thread: when every core is scoring, the main thread (which
# reads requests, sends replies and hands out work, in short bursts) still gets a core at once.
# Measured with two workers on two cores: p99 latency 0.79-0.94x of one worker's, not 0.98-1.18x.
LEARNER_NICE = 5


@dataclass
class Done:
    """A worker's answers to one run: a reply and outcome per message, with the seconds it took."""

    worker: "Worker"
    run: list  # the Messages
    answers: list[tuple[dict, str, float]]  # (reply, outcome, seconds charged) per message
    tokens_handed: int
    tokens_scored: int  # what counts toward the next checkpoint (duplicates and refusals score nothing)


@dataclass(eq=False)  # a worker is itself (hashable by identity), never equal to another
class Worker:
    index: int
    inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    runs: int = 0  # handed and not answered (main thread's count)
    messages: int = 0  # ...and the messages in them
    busy_since: float | None = None  # when the run being scored began (worker thread), None when idle
    thread: threading.Thread | None = None

    @property
    def label(self) -> str:
        return str(self.index)


class Workers:
    """N learner threads, the domains' assignment to them, and the queue of their answers."""

    def __init__(self, count: int, ctx: zmq.Context, score_run: Callable[[list], tuple[list, int]], metrics):
        self.workers = [Worker(i) for i in range(count)]
        self.score_run = score_run  # (messages) -> ([(reply, outcome, seconds)], tokens scored), any thread
        self.metrics = metrics
        self.answers: queue.SimpleQueue[Done] = queue.SimpleQueue()
        self.owner: dict[str, Worker] = {}  # domain -> its worker
        self.in_flight_of: Counter = Counter()  # domain -> runs handed and not answered
        self.ctx = ctx
        self.wake = ctx.socket(zmq.PULL)
        self.wake.bind(WAKE_ENDPOINT)
        for worker in self.workers:
            metrics.worker_queue_depth.labels(worker.label).set(0)
            metrics.worker_busy.labels(worker.label)
            metrics.worker_domains.labels(worker.label).set(0)
            worker.thread = threading.Thread(target=self._loop, args=(worker,), name=f"learner-{worker.index}", daemon=True)
            worker.thread.start()

    # --- main thread ----------------------------------------------------------------------------

    @property
    def runs_in_flight(self) -> int:
        return sum(w.runs for w in self.workers)

    def worker_for(self, domain: str) -> Worker:
        worker = self.owner.get(domain)
        if worker is None:
            loads = Counter(self.owner.values())
            worker = self.owner[domain] = min(self.workers, key=lambda w: (loads[w], w.index))
            self.metrics.worker_domains.labels(worker.label).inc()
        return worker

    def has_room(self, domain: str) -> bool:
        return self.worker_for(domain).runs < RUNS_QUEUED

    def all_full(self) -> bool:
        return all(w.runs >= RUNS_QUEUED for w in self.workers)

    def hand(self, domain: str, run: list, tokens: int) -> None:
        worker = self.worker_for(domain)
        worker.runs += 1
        worker.messages += len(run)
        self.in_flight_of[domain] += 1
        self.metrics.worker_queue_depth.labels(worker.label).set(worker.messages)
        worker.inbox.put((domain, run, tokens))

    def collect(self, keep: Callable[[str], bool]) -> list[Done]:
        """The answers finished so far. A domain with nothing in flight that `keep` does not want
        kept (it no longer exists) is unassigned, so names seen once do not pile up."""
        while True:  # the wake-ups only interrupt the poll; the answers are on the queue
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        done = []
        while True:
            try:
                item = self.answers.get_nowait()
            except queue.Empty:
                return done
            domain, result = item
            worker = result.worker
            worker.runs -= 1
            worker.messages -= len(result.run)
            self.metrics.worker_queue_depth.labels(worker.label).set(worker.messages)
            self.in_flight_of[domain] -= 1
            if not self.in_flight_of[domain]:
                del self.in_flight_of[domain]
                if not keep(domain):
                    self.unassign(domain)
            done.append(result)

    def unassign(self, domain: str) -> None:
        worker = self.owner.pop(domain, None)
        if worker is not None:
            self.metrics.worker_domains.labels(worker.label).dec()

    def wait(self, timeout: float) -> None:
        """Block until a worker answers (or `timeout` passes)."""
        self.wake.poll(int(timeout * 1000))

    def stuck(self, seconds: float) -> bool:
        """Whether a worker has been inside one run for longer than `seconds` (a wedged learner)."""
        now = time.monotonic()
        return any(w.busy_since is not None and now - w.busy_since > seconds for w in self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            worker.inbox.put(None)
        for worker in self.workers:
            worker.thread.join()
        self.wake.close(0)

    # --- worker threads -------------------------------------------------------------------------

    def _loop(self, worker: Worker) -> None:
        lower_priority_of_this_thread(LEARNER_NICE)
        wake = self.ctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(WAKE_ENDPOINT)
        busy = self.metrics.worker_busy.labels(worker.label)
        try:
            while (item := worker.inbox.get()) is not None:
                domain, run, tokens = item
                worker.busy_since = time.monotonic()
                start = time.perf_counter()
                answers, scored = self.score_run(run)
                busy.inc(time.perf_counter() - start)
                worker.busy_since = None
                self.answers.put((domain, Done(worker, run, answers, tokens, scored)))
                try:
                    wake.send(b"", zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the main thread has wake-ups queued already; it reads every answer when it wakes
        finally:
            wake.close(0)


def lower_priority_of_this_thread(steps: int) -> None:
    """Nice the calling thread `steps` below where it is (Linux applies nice per thread)."""
    try:
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, me) + steps)
    except (OSError, AttributeError):  # not permitted, or not Linux: the order stays the kernel's
        pass
