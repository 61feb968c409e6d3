"""The rules of a fleet's handoffs (daemon/handoff.py), on learners in this process and real files:
a domain given away continues exactly on its new owner; a stale copy never replaces a newer one; a
file taken over is deleted only once a checkpoint holds its domain; a change settles only when
every member has applied it, and a member that left silently has its domains recovered."""

from __future__ import annotations

import numpy as np
import pytest

from rnnlm.checkpoint import CheckpointError, load_model
from rnnlm.daemon.fleet import Fleet
from rnnlm.daemon.handoff import Handoffs, generation, model_fingerprint
from rnnlm.daemon.learner import Learner
from rnnlm.daemon.protocol import Request
from rnnlm.model import OnlineRule
from tests.test_model import toy_text

LINES = toy_text(40, seed=4)
FLEET = Fleet.parse("alpha ipc:///a\nbeta ipc:///b\n")


def learner_of(model_path) -> Learner:
    return Learner(load_model(model_path), OnlineRule(lr=0.01))


def score(learner: Learner, domain: str, i: int) -> np.ndarray:
    request = Request("score", stream=f"s{i % 2}", domain=domain, sentences=[LINES[i % len(LINES)].split()])
    return learner.score(request).logprobs.copy()


def members(tmp_path, model):
    stores = {}
    for name in ("alpha", "beta"):
        stores[name] = Handoffs(tmp_path, name, wait_seconds=0.0)
        stores[name].base = model_fingerprint(model)
    return stores


def test_a_domain_given_away_goes_on_exactly_where_it_was(tmp_path, model_path):
    giver, taker, alone = learner_of(model_path), learner_of(model_path), learner_of(model_path)
    stores = members(tmp_path, giver.model)
    for i in range(12):
        score(giver, "news", i)
        score(alone, "news", i)
    path = stores["alpha"].give(giver, "news", "beta")
    assert path.name.endswith(".1.pt")  # its first move
    files = stores["beta"].to_take(taker, Fleet.parse("beta ipc:///b\n"))
    assert list(files) == ["news"]
    taker.restore(stores["beta"].read(files["news"][0]), str(path), only={"news"})
    assert taker.domains["news"].moves == 1
    for i in range(12, 20):  # the two streams go on, on the new owner, as if nothing happened
        assert np.array_equal(score(taker, "news", i), score(alone, "news", i))
    assert taker.domains["news"].updates == alone.domains["news"].updates


def test_a_stale_copy_never_replaces_a_newer_one(tmp_path, model_path):
    learner = learner_of(model_path)
    stores = members(tmp_path, learner.model)
    score(learner, "news", 0)
    stale = learner.part_payload(["news"])  # as a checkpoint taken before the move holds it
    assert stores["alpha"].give(learner, "news", "beta") is not None
    learner.restore({**stale, "evicted": {}}, "an old checkpoint", only={"news"})  # the giver restarted from it
    assert stores["alpha"].give(learner, "news", "beta") is None  # the file there has moved once already
    assert len(stores["alpha"].files()) == 1


def test_a_file_taken_over_is_deleted_once_a_checkpoint_holds_the_domain(tmp_path, model_path):
    giver, taker = learner_of(model_path), learner_of(model_path)
    stores = members(tmp_path, giver.model)
    score(giver, "news", 0)
    path = stores["alpha"].give(giver, "news", "beta")
    files = stores["beta"].to_take(taker, FLEET)["news"]
    taker.restore(stores["beta"].read(files[0]), str(path), only={"news"})
    stores["beta"].took("news", files, checkpoint_seq=7)  # checkpoint 7 was being written: it predates the take
    stores["beta"].checkpointed(7, held=lambda d: d in taker.domains)
    assert path.exists()
    assert stores["beta"].to_take(taker, FLEET) == {}  # taken already: not taken twice
    stores["beta"].checkpointed(8, held=lambda d: d in taker.domains)
    assert not path.exists()


def test_a_file_from_another_base_model_is_refused(tmp_path, model_path):
    giver, taker = learner_of(model_path), learner_of(model_path)
    stores = members(tmp_path, giver.model)
    score(giver, "news", 0)
    stores["alpha"].give(giver, "news", "beta")
    stores["beta"].base = "another model"
    files = stores["beta"].to_take(taker, FLEET)["news"]
    with pytest.raises(CheckpointError, match="another base model"):
        stores["beta"].read(files[0])


def test_a_change_settles_when_every_member_applied_it_or_left_and_was_recovered(tmp_path, model_path):
    model = load_model(model_path)
    stores = members(tmp_path, model)
    three = Fleet.parse("alpha ipc:///a\nbeta ipc:///b\ngamma ipc:///c\n")
    recovered = []
    stores["alpha"].apply(three, FLEET)  # gamma leaves
    stores["alpha"].applied()
    assert not stores["alpha"].settle(FLEET, recovered.append)  # beta has not applied it yet
    assert recovered == ["gamma"]  # gamma never said it handed over: recovered (--handoff-wait 0)
    stores["beta"].apply(three, FLEET)
    stores["beta"].applied()
    assert (tmp_path / "done" / "beta").read_text().strip() == generation(FLEET)
    assert stores["alpha"].settle(FLEET, recovered.append)
    assert recovered == ["gamma"]  # once


def test_a_domain_goes_back_and_forth_before_any_checkpoint(tmp_path, model_path):
    learners = {"alpha": learner_of(model_path), "beta": learner_of(model_path)}
    alone = learner_of(model_path)
    stores = members(tmp_path, alone.model)
    for i in range(4):
        score(learners["alpha"], "news", i)
        score(alone, "news", i)
    for move in range(4):
        giver, taker = ("alpha", "beta") if move % 2 == 0 else ("beta", "alpha")
        stores[giver].give(learners[giver], "news", taker)
        learners[giver].drop_domain("news")
        files = stores[taker].to_take(learners[taker], Fleet.parse(f"{taker} ipc:///x\n"))["news"]
        learners[taker].restore(stores[taker].read(files[0]), "handoff", only={"news"})
        stores[taker].took("news", files, checkpoint_seq=0)  # no checkpoint in between
        score(learners[taker], "news", 4 + move)
        score(alone, "news", 4 + move)
    assert learners["alpha"].domains["news"].moves == 4
    assert learners["alpha"].domains["news"].updates == alone.domains["news"].updates
