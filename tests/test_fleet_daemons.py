"""A fleet of three real daemons on loopback (`rnnlm serve --fleet`): each domain is served by its
owner alone, the others answer `moved`, and the clients follow, so the numbers are those of one
daemon given the same messages of each domain in the same order."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rnnlm.clients.async_client import AsyncClient
from rnnlm.clients.client import Client
from rnnlm.daemon.fleet import Fleet
from tests.daemon_helpers import Daemon
from tests.test_c_client import binary, run_client  # noqa: F401 (binary is a fixture)
from tests.test_model import toy_text

NAMES = ("alpha", "beta", "gamma")
LINES = toy_text(120, seed=5)


def fleet_text(tmp: Path, names=NAMES) -> str:
    return "".join(f"{n} ipc://{tmp}/{n}.sock\n" for n in names)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, model_path):
    """Three members and, beside them, one daemon without a fleet to compare with."""
    tmp = tmp_path_factory.mktemp("fleet")
    path = tmp / "fleet.txt"
    path.write_text(fleet_text(tmp))
    members = {}
    try:
        for name in NAMES:
            members[name] = Daemon(tmp, model_path, "--bind", f"ipc://{tmp}/{name}.sock", "--fleet", str(path),
                                   "--fleet-name", name, "--max-domains", "64")
        members["single"] = Daemon(tmp, model_path, "--max-domains", "64")
        yield tmp, path, members
    finally:
        for daemon in members.values():
            daemon.stop()


def traffic(prefix: str, domains: int = 6, messages: int = 60) -> list[dict]:
    """Score requests of several domains and streams, interleaved."""
    return [{"op": "score", "domain": f"{prefix}-{i % domains}", "stream": f"s{i % 4}", "text": LINES[i % len(LINES)]}
            for i in range(messages)]


def single_replies(members, requests: list[dict]) -> list[dict]:
    with Client(members["single"].endpoint) as c:
        return list(c.pipeline(requests))


def same_scores(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["ok"], g
        assert g["logprobs"] == w["logprobs"]  # exactly: the same messages, in the same order, per domain
        assert g["stream_perplexity"] == w["stream_perplexity"]


def owners(path: Path, domains) -> dict[str, str]:
    fleet = Fleet.read(path)
    return {d: fleet.owner(d).name for d in domains}


def test_each_domain_is_served_by_its_owner_and_scores_as_one_daemon_would(fleet):
    tmp, path, members = fleet
    requests = traffic("one")
    with Client(members["alpha"].endpoint) as c:
        got = [c.request(r["op"], **{k: v for k, v in r.items() if k != "op"}) for r in requests]
        redirects = c.routes.redirects
    same_scores(got, single_replies(members, requests))
    owner = owners(path, {r["domain"] for r in requests})
    assert set(owner.values()) == set(NAMES), "the test's domains should land on every member"
    # one redirect per domain alpha does not own: after that, the client goes straight to the owner
    assert redirects == sum(1 for name in owner.values() if name != "alpha")
    for name in NAMES:
        with Client(members[name].endpoint) as c:
            stats = c.stats()
        held = {d for d in stats["domains"] if d.startswith("one-")}
        assert held == {d for d, n in owner.items() if n == name}  # nothing was created on another member
        assert set(stats["fleet"]["owned_domains"]) >= held


def test_a_pipeline_through_any_member_keeps_each_streams_order(fleet):
    tmp, path, members = fleet
    requests = traffic("pipe", messages=90)
    with Client(members["beta"].endpoint) as c:
        got = list(c.pipeline(requests, window=16))
    same_scores(got, single_replies(members, requests))


def test_the_async_client_follows_redirects_too(fleet):
    tmp, path, members = fleet
    requests = traffic("async", messages=60)

    async def run():
        async with AsyncClient(members["gamma"].endpoint) as c:
            return [reply async for reply in c.pipeline(requests, window=8)]

    same_scores(asyncio.run(run()), single_replies(members, requests))


def test_a_member_names_the_owner_in_a_moved_reply(fleet):
    tmp, path, members = fleet
    owner = owners(path, [f"moved-{i}" for i in range(12)])
    domain = next(d for d, n in owner.items() if n != "alpha")
    with Client(members["alpha"].endpoint) as c:
        reply = c.send("score", domain=domain, stream="s", text="the cat sees fish")
        reply = c.receive(time.monotonic() + 30)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "moved"
    assert reply["error"]["owner"] == owner[domain]
    assert reply["error"]["endpoint"] == f"ipc://{tmp}/{owner[domain]}.sock"
    assert members["alpha"].metric("rnnlm_messages_total", socket="router", op="score", outcome="moved") >= 1


def test_the_c_client_reports_the_owner(fleet, binary):  # noqa: F811 (binary is a fixture)
    tmp, path, members = fleet
    owner = owners(path, [f"c-{i}" for i in range(12)])
    domain = next(d for d, n in owner.items() if n != "alpha")
    done = run_client(binary, members["alpha"].endpoint, ["the cat sees fish"], "--domain", domain)
    assert done.returncode == 3, done.stderr
    assert f"owner\t{owner[domain]}\tipc://{tmp}/{owner[domain]}.sock" in done.stderr
    done = run_client(binary, f"ipc://{tmp}/{owner[domain]}.sock", ["the cat sees fish"], "--domain", domain)
    assert done.returncode == 0, done.stderr


def wait_for_log(daemon: Daemon, text: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while daemon.output().count(text) < count:
        assert time.monotonic() < deadline, daemon.output()[-2000:]
        time.sleep(0.1)


def test_sighup_rereads_the_fleet_and_a_bad_file_keeps_the_one_in_force(fleet):
    tmp, path, members = fleet
    domains = [f"hup-{i}" for i in range(12)]
    before = owners(path, domains)
    leaving = next(d for d, n in before.items() if n == "gamma")
    try:
        path.write_text("alpha ipc:///x.sock\nalpha ipc:///y.sock\n")  # names alpha twice
        for name in NAMES:
            members[name].proc.send_signal(signal.SIGHUP)
            wait_for_log(members[name], "could not reload the fleet", 1)
        with Client(members["alpha"].endpoint) as c:  # the old fleet is still in force
            c.score("the cat sees fish", domain=leaving, stream="s")
            assert c.routes.owner[leaving].endswith("gamma.sock")

        path.write_text(fleet_text(tmp, NAMES[:2]))  # gamma leaves
        for name in NAMES:
            members[name].proc.send_signal(signal.SIGHUP)
            wait_for_log(members[name], "fleet of 2 member(s)", 1)
        after = owners(path, domains)
        assert all(after[d] == before[d] for d in domains if before[d] != "gamma")  # only gamma's domains move
        with Client(members["gamma"].endpoint) as c:  # gamma redirects what it held to the new owners
            reply = c.score("the cat sees fish", domain=leaving, stream="s")
            assert reply["ok"]
            assert c.routes.owner[leaving].endswith(f"{after[leaving]}.sock")
        assert "not in the fleet file" in members["gamma"].output()
    finally:
        path.write_text(fleet_text(tmp))
        for name in NAMES:
            members[name].proc.send_signal(signal.SIGHUP)
            wait_for_log(members[name], "fleet of 3 member(s)", 1)


def test_a_bad_fleet_file_stops_the_start_with_one_line(tmp_path, model_path):
    path = tmp_path / "fleet.txt"
    path.write_text("alpha tcp://127.0.0.1:1\nbeta 127.0.0.1:2\n")
    done = subprocess.run([sys.executable, "-m", "rnnlm.cli", "serve", "--model", str(model_path), "--fleet", str(path),
                           "--fleet-name", "alpha"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"Error: {path}, line 2: '127.0.0.1:2' is not an endpoint" in done.stderr
    assert "Traceback" not in done.stderr


def test_fire_and_forget_messages_for_another_members_domain_are_forwarded_in_order(tmp_path, model_path):
    import msgpack
    import zmq

    path = tmp_path / "fleet.txt"
    path.write_text(fleet_text(tmp_path, NAMES[:2]))
    domain = next(d for d, n in owners(path, [f"push-{i}" for i in range(12)]).items() if n == "beta")
    messages = [{"v": 1, "op": "score", "domain": domain, "stream": "s", "text": line} for line in LINES[:40]]
    members = {name: Daemon(tmp_path, model_path, "--bind", f"ipc://{tmp_path}/{name}.sock", "--fleet", str(path),
                            "--fleet-name", name, "--pull-bind", f"ipc://{tmp_path}/{name}-pull.sock")
               for name in NAMES[:2]}
    try:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(members["alpha"].pull_endpoint)  # not the owner
        for m in messages:
            push.send(msgpack.packb(m))
        push.close(linger=5000)
        deadline = time.monotonic() + 60
        while members["beta"].metric("rnnlm_messages_total", socket="router", op="score", outcome="ok") < len(messages):
            assert time.monotonic() < deadline, members["beta"].output()[-2000:]
            time.sleep(0.1)
        assert members["alpha"].metric("rnnlm_messages_total", socket="pull", op="score", outcome="forwarded") == len(messages)
        probe = {"op": "score", "domain": domain, "stream": "s", "text": LINES[50], "learn": False}
        with Client(members["alpha"].endpoint) as c:
            got = c.request(**probe)
    finally:
        for daemon in members.values():
            daemon.stop()
    with Daemon(tmp_path, model_path) as single:
        with Client(single.endpoint) as c:
            for m in messages:
                c.score(m["text"], domain=domain, stream="s")
            want = c.request(**probe)
        single.stop()
    assert got["logprobs"] == want["logprobs"] and got["updates"] == want["updates"]  # each applied once, in order
