"""Domains have owners and an end: `learn: false` never creates one, `drop_domain`, idle expiry
(checkpointed first), control ops limited to admin keys, and per-key quotas, all with CURVE real."""

from __future__ import annotations

import shutil
import time

import pytest

from rnnlm.checkpoint import read_checked
from rnnlm.clients.client import Client, DaemonError
from rnnlm.daemon.learner import STATE_FORMAT
from tests.daemon_helpers import Daemon
from tests.test_trust import keys, wait_for  # noqa: F401 (a fixture)


def test_learn_false_never_creates_a_domain_and_drop_domain_frees_one(tmp_path, model_path):
    with Daemon(tmp_path, model_path, "--max-domains", "2") as d, Client(d.endpoint) as c:
        c.score("the cat sees a dog", stream="s")  # the default domain
        for i in range(5):  # read-only scores of domains that do not exist: base weights, nothing made
            reply = c.score("the cat sees a dog", stream="s", domain=f"ghost{i}", learn=False)
            assert reply["learned"] == 0
        assert sorted(c.stats()["domains"]) == ["default"]
        base = c.score("the cat sees a dog", stream="fresh", domain="ghost", learn=False)["logprobs"]
        c.score("the cat sees a dog", stream="s", domain="d2")
        with pytest.raises(DaemonError, match="too_many_domains"):
            c.score("a dog", stream="s", domain="d3")
        assert c.request("drop_domain", domain="d2")["existed"] is True
        assert c.request("drop_domain", domain="d2")["existed"] is False
        assert c.score("a dog", stream="s", domain="d3")["ok"]
        assert sorted(c.stats()["domains"]) == ["d3", "default"]
        # a fresh domain starts from the base weights: the same numbers as the read-only score
        assert c.score("the cat sees a dog", stream="fresh", domain="d4", learn=False)["logprobs"] == base
        assert d.metric("rnnlm_tokens_total", domain="_none") > 0 and d.metric("rnnlm_tokens_total", domain="ghost0") == 0
        assert d.stop() == 0


def test_an_idle_domain_expires_after_a_checkpoint_that_holds_it(tmp_path, model_path):
    state = tmp_path / "state"
    with Daemon(tmp_path, model_path, "--domain-idle-seconds", "2", state_dir=state) as d, Client(d.endpoint) as c:
        c.score("the cat sees a dog", stream="s", domain="brief")
        updates = c.stats()["domains"]["brief"]["updates"]
        assert wait_for(lambda: "brief" not in c.stats()["domains"], seconds=10)
        assert d.metric("rnnlm_domains_expired_total") == 1
        newest = sorted(state.glob("state-*.pt"))[-1]
        assert read_checked(newest, STATE_FORMAT)["domains"]["brief"]["updates"] == updates
        assert "expiring 1 domain(s)" in d.output()
        assert d.stop() == 0


def test_control_ops_need_an_admin_key_and_each_key_has_a_domain_quota(tmp_path, keys, model_path):  # noqa: F811
    k = keys / "keys"
    authorized, admins = tmp_path / "authorized", tmp_path / "admins"
    authorized.mkdir()
    admins.mkdir()
    for name in ("alice", "mallory"):
        shutil.copy(k / f"{name}.key", authorized)
    shutil.copy(k / "alice.key", admins)
    with Daemon(tmp_path, model_path, "--curve-secret-key", k / "server.key_secret", "--curve-authorized-dir",
                authorized, "--curve-admin-dir", admins, "--max-domains-per-key", "2", "--max-domains", "8",
                state_dir=tmp_path / "state") as d, \
            Client(d.endpoint, curve=(k / "alice.key_secret", k / "server.key")) as alice, \
            Client(d.endpoint, curve=(k / "mallory.key_secret", k / "server.key")) as mallory:
        mallory.score("a dog", stream="m", domain="m1")
        mallory.score("a dog", stream="m", domain="m2")
        with pytest.raises(DaemonError, match="too_many_domains"):
            mallory.score("a dog", stream="m", domain="m3")
        mallory.score("a dog", stream="m", domain="m1")  # its own domains still serve it
        for op, fields in (("save", {}), ("reset", {"stream": "m"}), ("drop_domain", {"domain": "m1"})):
            with pytest.raises(DaemonError, match="forbidden"):
                mallory.request(op, **fields)
        assert alice.save()["path"]
        assert alice.request("drop_domain", domain="m1")["existed"]
        mallory.score("a dog", stream="m", domain="m3")  # back under its quota
        alice.score("a dog", stream="a", domain="a1")
        assert d.stop() == 0, d.output()
