"""A checkpoint's snapshot is the learner's state at one moment, although most of it is copied
later, by the writer thread, while the learner goes on scoring (daemon/state.py, Snapshot)."""

from __future__ import annotations

import torch

from rnnlm.checkpoint import load_model
from rnnlm.daemon.learner import Learner
from rnnlm.daemon.protocol import Request
from rnnlm.daemon.state import Snapshot
from rnnlm.model import OnlineRule
from tests.test_model import toy_text

LINES = toy_text(60, seed=9)


def same(a, b, where="payload") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def score(learner: Learner, i: int, learn: bool = True) -> None:
    request = Request("score", stream=f"s{i % 4}", domain=f"d{i % 2}", sentences=[LINES[i % len(LINES)].split()],
                      learn=learn)
    learner.score(request)
    stream = learner.streams[(request.domain, request.stream)]
    stream.seq, stream.seq_reply = i, f"reply {i}".encode()  # as the server records a numbered message


def test_what_changes_after_the_snapshot_is_not_in_it(model_path):
    learner = Learner(load_model(model_path), OnlineRule(lr=0.01))
    for i in range(20):
        score(learner, i)
    expected = learner.to_payload(copy=True)

    snapshot = Snapshot(learner)
    for i in range(20, 40):  # every stream and domain changes before the writer gets to it
        score(learner, i, learn=i % 3 != 0)
    learner.reset("d0", "s0")
    payload = snapshot.complete()
    snapshot.release()

    same({k: payload[k] for k in expected}, expected)
    assert learner.to_payload()["streams"] != expected["streams"]  # the learner did move on
