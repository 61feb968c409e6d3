"""Domains handed between real daemons with nothing lost (`rnnlm serve --fleet --fleet-store`).

Members share a store directory on this machine's disk. While one client thread per domain streams
its messages, a member joins, a member leaves with SIGTERM and a member is SIGKILLed. Every message
must end with one ok reply, and every reply must equal, to the last bit, what one daemon without a
fleet answers to the same messages of each domain in the same order: then no update was lost or
applied twice (the `updates` count of every reply is compared too).

A message is sent with its stream's sequence number (docs/protocol.md, exactly-once retries), so a
retry after a timeout is learned from once. After the kill, the messages the dead member learned
from after its last checkpoint are lost (its crash-loss bound): the new owner, recovered from that
checkpoint, answers `out_of_order` with the number it expects, and the client sends again from
there. The test counts those messages and checks them against the bound."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from rnnlm.clients.client import Client, ReplyTimeout
from rnnlm.daemon.fleet import Fleet, moved_domains
from tests.daemon_helpers import Daemon
from tests.test_model import toy_text

DOMAINS = [f"p{i}" for i in range(8)]  # moved by every change below, to and from each member (checked)
MESSAGES = 70  # per domain
LINES = toy_text(200, seed=11)
CHECKPOINT_TOKENS = 60
AFTER_THE_KILL = 10  # messages of each domain held back until a member has been killed


def fleet_text(tmp: Path, names) -> str:
    return "".join(f"{n} ipc://{tmp}/{n}.sock\n" for n in names)


class DomainStream(threading.Thread):
    """Sends one domain's messages in order, one at a time, until each has an ok reply."""

    def __init__(self, seed: str, domain: str, progress: "Progress"):
        super().__init__(daemon=True)
        self.seed, self.domain, self.progress = seed, domain, progress
        self.texts = [LINES[(i * 7 + len(domain)) % len(LINES)] for i in range(MESSAGES)]
        self.replies: list[dict | None] = [None] * MESSAGES
        self.timeouts = self.sent_again = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.send_all()
        except BaseException as err:  # reported by the test
            self.error = err

    def send_all(self) -> None:
        deadline = time.monotonic() + 150
        with Client(self.seed, timeout=2.0) as client:
            i = 0
            while i < MESSAGES:
                assert time.monotonic() < deadline, f"{self.domain}: stuck at message {i}"
                if i == MESSAGES - AFTER_THE_KILL:
                    self.progress.killed.wait(120)  # some of every domain's messages come after the kill
                try:
                    reply = client.request("score", check=False, domain=self.domain, stream="s",
                                           text=self.texts[i], seq=i + 1)
                except ReplyTimeout:  # its owner may be gone: ask the seed member again
                    client.routes.owner.pop(self.domain, None)
                    self.timeouts += 1
                    continue
                error = reply.get("error") or {}
                if reply["ok"]:
                    self.replies[i] = reply
                    i += 1
                    self.progress.add()
                    time.sleep(0.01)
                elif error.get("code") == "out_of_order" and error["expected"] <= i:
                    self.sent_again += i + 1 - error["expected"]  # learned by a member that died since
                    i = error["expected"] - 1
                elif error.get("code") == "moved":  # members still applying a change name each other
                    time.sleep(0.2)
                else:
                    raise AssertionError(f"{self.domain} message {i}: {reply}")


class Progress:
    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()
        self.killed = threading.Event()

    def add(self) -> None:
        with self.lock:
            self.count += 1

    def wait_for(self, count: int, streams, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.count < count:
            assert time.monotonic() < deadline, f"only {self.count} of {count} messages answered"
            assert all(s.is_alive() or s.error is None for s in streams), [s.error for s in streams]
            time.sleep(0.05)


def member(tmp: Path, store: Path, fleet_file: Path, model_path: Path, name: str) -> Daemon:
    return Daemon(tmp, model_path, "--bind", f"ipc://{tmp}/{name}.sock", "--fleet", str(fleet_file),
                  "--fleet-name", name, "--fleet-store", str(store), "--handoff-wait", "3",
                  "--checkpoint-tokens", str(CHECKPOINT_TOKENS), "--max-domains", "64", "--workers", "1")


def moved(before: list[str], after: list[str]) -> dict[str, tuple[str, str]]:
    fleets = [Fleet.parse(fleet_text(Path("/x"), names)) for names in (before, after)]
    return moved_domains(*fleets, DOMAINS)


def applied(daemon: Daemon, members: int) -> None:
    deadline = time.monotonic() + 30
    while daemon.metric("rnnlm_fleet_members") != members:
        assert time.monotonic() < deadline, daemon.output()[-2000:]
        time.sleep(0.05)


def reload(fleet_file: Path, text: str, daemons) -> None:
    fleet_file.write_text(text)
    for daemon in daemons:
        daemon.proc.send_signal(signal.SIGHUP)


def test_join_leave_and_kill_lose_nothing_and_apply_nothing_twice(tmp_path, model_path):
    moves = {"join": moved(["alpha", "beta"], ["alpha", "beta", "gamma"]),
             "leave": moved(["alpha", "beta", "gamma"], ["alpha", "gamma"])}
    assert {(old, new) for old, new in moves["join"].values()} == {("alpha", "gamma"), ("beta", "gamma")}
    assert {(old, new) for old, new in moves["leave"].values()} == {("beta", "alpha"), ("beta", "gamma")}
    store, fleet_file = tmp_path / "store", tmp_path / "fleet.txt"
    fleet_file.write_text(fleet_text(tmp_path, ["alpha", "beta"]))
    members = {}
    try:
        for name in ("alpha", "beta"):
            members[name] = member(tmp_path, store, fleet_file, model_path, name)
        progress = Progress()
        streams = [DomainStream(members["alpha"].endpoint, d, progress) for d in DOMAINS]
        for s in streams:
            s.start()
        total = len(DOMAINS) * MESSAGES

        progress.wait_for(total // 5, streams)  # a member joins
        reload(fleet_file, fleet_text(tmp_path, ["alpha", "beta", "gamma"]), [members["alpha"], members["beta"]])
        members["gamma"] = member(tmp_path, store, fleet_file, model_path, "gamma")
        progress.wait_for(2 * total // 5, streams)

        # a member leaves: dropped from the fleet, then stopped with SIGTERM
        reload(fleet_file, fleet_text(tmp_path, ["alpha", "gamma"]), [members["alpha"], members["gamma"]])
        assert members["beta"].stop(signal.SIGTERM) == 0
        progress.wait_for(3 * total // 5, streams)

        # a member is killed (once it has checkpointed the domains it took), then dropped from the fleet
        gamma = members["gamma"]
        deadline = time.monotonic() + 60
        while gamma.metric("rnnlm_checkpoints_total", outcome="ok") < 2:
            assert time.monotonic() < deadline, gamma.output()[-3000:]
            time.sleep(0.1)
        taken_by_gamma = gamma.metric("rnnlm_handoffs_total", direction="taken")
        gamma.stop(signal.SIGKILL)
        reload(fleet_file, fleet_text(tmp_path, ["alpha"]), [members["alpha"]])
        progress.killed.set()

        for s in streams:
            s.join(180)
        errors = {s.domain: s.error for s in streams if s.error is not None or s.is_alive()}
        assert not errors, (errors, members["alpha"].output()[-3000:])

        # every final reply equals one daemon's, given each domain's messages in order
        with Daemon(tmp_path, model_path, "--max-domains", "64") as single:
            with Client(single.endpoint) as c:
                for s in streams:
                    want = list(c.pipeline([{"op": "score", "domain": s.domain, "stream": "s", "text": t}
                                            for t in s.texts]))
                    for i, (got, expected) in enumerate(zip(s.replies, want)):
                        assert got["logprobs"] == expected["logprobs"], (s.domain, i)
                        assert got["updates"] == expected["updates"], (s.domain, i)  # nothing learned twice
                        assert got["stream_perplexity"] == expected["stream_perplexity"], (s.domain, i)
            single.stop()

        alpha = members["alpha"]
        assert members["beta"].output().count("handed over to") >= 1
        assert taken_by_gamma >= 1  # the join moved domains to gamma, through the store
        assert alpha.metric("rnnlm_handoffs_total", direction="taken") >= 1  # beta's, when it left
        assert alpha.metric("rnnlm_handoffs_total", direction="recovered") >= 1  # gamma's, from its checkpoint
        with Client(alpha.endpoint) as c:
            assert sorted(c.stats()["fleet"]["owned_domains"]) == sorted(DOMAINS)

        # what the kill cost: messages learned by gamma after its last checkpoint, sent again
        lost = {s.domain: s.sent_again for s in streams if s.sent_again}
        print("messages sent again after the kill, by domain:", lost, "timeouts:", sum(s.timeouts for s in streams))
        tokens_per_message = max(len(t.split()) + 1 for t in LINES)
        bound = 2 * CHECKPOINT_TOKENS // 3 + 2  # two checkpoints' worth of messages, and one in flight, at least 3 tokens each
        assert sum(lost.values()) <= bound, (lost, tokens_per_message)
    finally:
        for daemon in members.values():
            daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM)


def test_a_member_restarted_takes_back_what_it_handed_over_when_stopping(tmp_path, model_path):
    """A pod's restart (a rolling update): SIGTERM hands its domains over through the store; the
    fleet has not changed, so the member itself owns them again when it comes back."""
    store, fleet_file = tmp_path / "store", tmp_path / "fleet.txt"
    fleet_file.write_text(fleet_text(tmp_path, ["alpha", "beta"]))
    requests = [{"op": "score", "domain": d, "stream": "s", "text": LINES[i % len(LINES)]}
                for i in range(40) for d in DOMAINS]
    half = len(requests) // 2
    members = {name: member(tmp_path, store, fleet_file, model_path, name) for name in ("alpha", "beta")}
    try:
        with Client(members["alpha"].endpoint) as c:
            got = list(c.pipeline(requests[:half]))
        assert members["beta"].stop(signal.SIGTERM) == 0
        assert len(list((store / "handoff").glob("*.pt"))) == len(moved(["alpha"], ["alpha", "beta"]))
        members["beta"] = member(tmp_path, store, fleet_file, model_path, "beta")
        with Client(members["alpha"].endpoint) as c:
            got += list(c.pipeline(requests[half:]))
        assert members["beta"].metric("rnnlm_handoffs_total", direction="taken") == len(moved(["alpha"], ["alpha", "beta"]))
    finally:
        for daemon in members.values():
            daemon.stop()
    with Daemon(tmp_path, model_path, "--max-domains", "64") as single:
        with Client(single.endpoint) as c:
            want = list(c.pipeline(requests))
        single.stop()
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g["logprobs"], g["updates"]) == (w["logprobs"], w["updates"]), i


def test_a_domain_handed_back_waits_for_the_member_that_has_it(tmp_path, model_path):
    """A -> B -> A with B applying the second change late (stopped; a kubelet that syncs its pod
    later): A must not take the file it once gave B, which B took and learned from since. A holds
    the domain's messages until B hands it back, then every update of all three is there."""
    store, fleet_file = tmp_path / "store", tmp_path / "fleet.txt"
    one, two = fleet_text(tmp_path, ["alpha"]), fleet_text(tmp_path, ["alpha", "beta"])
    domain = next(d for d in (f"back{i}" for i in range(50)) if Fleet.parse(two).owner(d).name == "beta")
    fleet_file.write_text(one)
    a, b = (Daemon(tmp_path, model_path, "--bind", f"ipc://{tmp_path}/{name}.sock", "--fleet", str(fleet_file),
                   "--fleet-name", name, "--fleet-store", str(store)) for name in ("alpha", "beta"))
    texts = [LINES[0], LINES[1], LINES[2]]
    try:
        with Client(a.endpoint, timeout=60) as c:
            c.score(texts[0], domain=domain, stream="s")
            reload(fleet_file, two, [a, b])
            applied(a, 2)
            c.score(texts[1], domain=domain, stream="s")  # redirected to beta, which took the domain
            assert b.metric("rnnlm_handoffs_total", direction="taken") == 1
            b.proc.send_signal(signal.SIGSTOP)
            reload(fleet_file, one, [a])
            applied(a, 1)
            started = time.monotonic()
            threading.Timer(3.0, b.proc.send_signal, (signal.SIGCONT,)).start()
        with Client(a.endpoint, timeout=60) as c:  # straight to alpha, the owner now
            third = c.score(texts[2], domain=domain, stream="s")
            waited = time.monotonic() - started
        assert waited >= 2.5, waited  # held until beta handed the domain back
        assert third["updates"] == sum(len(t.split()) + 1 for t in texts)  # all three learned, once each
        assert a.metric("rnnlm_handoffs_total", direction="recovered") == 0
    finally:
        b.proc.send_signal(signal.SIGCONT)
        for daemon in (a, b):
            daemon.stop()
