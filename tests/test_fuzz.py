"""Property-based fuzzing of one live daemon: generated and mutated messages by the ten thousand.

Hypothesis draws batches of messages — valid requests, valid requests with a field dropped,
replaced by a value of another type or joined by junk, arbitrary msgpack values, and frames that
are truncated, bit-flipped, spliced, padded past the size limit or random bytes, sometimes behind
extra envelope frames, small or near the frame limit — and pipelines each batch over one DEALER
socket to ONE daemon process. For every message:

* exactly one reply comes back, in order, with the request's `id` where the request had a readable
  one (nil otherwise; read here with msgpack itself, not with the daemon's code);
* a REQ-style envelope (one empty delimiter) comes back as sent; any other envelope is refused
  with `bad_request` and never echoed (the reply is one frame);
* the process never dies and never answers `internal`.

At the end the daemon's weights must be exactly what the accepted messages alone make of the
base model: every accepted `score` and `reset` is replayed in order through an in-process Learner,
each reply's log-probabilities must match the replay's, and the daemon's checkpointed weights of
every domain must equal the replay's bit for bit. So no rejected message changed anything. The
same holds after a thousand of the frames are sent again on the fire-and-forget PULL socket.

FUZZ_SEED=<n> in the environment draws a different (still reproducible) set of messages.
"""

from __future__ import annotations

import math
import os
import time

import msgpack
import numpy as np
import zmq
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from rnnlm.checkpoint import load_model, read_checked, weights_from_tensors
from rnnlm.clients.client import Client
from rnnlm.daemon import protocol
from rnnlm.daemon.learner import STATE_FORMAT, Learner, NoRoom
from rnnlm.daemon.protocol import ProtocolError
from rnnlm.model import OnlineRule
from tests.daemon_helpers import Daemon

MAX_TOKENS, MAX_BYTES, MAX_DOMAINS, MAX_STREAMS = 50, 4096, 4, 8
BATCH = 25
EXAMPLES = 410  # × BATCH ≥ 10,000 messages
WORDS = ["the", "cat", "a", "dog", "my", "friend", "sees", "likes", "eats", "fish", "bread", "ball", "zorro",
         "unicornz", "</s>", "<rare>", "<unk>", "ünï", "日本"]

# --- strategies ------------------------------------------------------------------------------------

names = st.one_of(st.sampled_from(["s1", "s2", "s3", "s4", "default", "d2", "d3", "d4", "d5", "x" * 128, "x" * 129, ""]),
                  st.text(max_size=6))
sentences = st.lists(st.lists(st.sampled_from(WORDS), min_size=0, max_size=12), min_size=1, max_size=5)
texts = st.one_of(sentences.map(lambda ss: "\n".join(" ".join(s) for s in ss)),
                  st.text(alphabet=st.sampled_from(list(" \n\t\r\u00a0\u2028\u3000abc")), max_size=40))
token_lists = st.one_of(st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=5)), max_size=12),
                        st.lists(st.sampled_from(WORDS), min_size=45, max_size=60))  # around --max-tokens
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=12), st.binary(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-2 ** 63, 2 ** 63 - 1)),
                                                                       inner, max_size=4)),
                      max_leaves=12)
optional = {"domain": names, "learn": st.one_of(st.booleans(), st.booleans(), st.booleans(), scalars),
            "v": st.one_of(st.just(1), st.just(1), st.just(1), scalars)}
score_text = st.fixed_dictionaries({"op": st.just("score"), "stream": names, "text": texts}, optional=optional)
score_tokens = st.fixed_dictionaries({"op": st.just("score"), "stream": names, "tokens": token_lists},
                                     optional=optional)
control = st.fixed_dictionaries({"op": st.sampled_from(["ping", "info", "stats", "reset", "fly", ""])},
                                optional={"stream": names, "domain": names, "v": st.just(1)})
requests = st.one_of(score_text, score_text, score_tokens, control,
                     st.just({"op": "save"}))  # save: a checkpoint written mid-fuzz changes nothing either


@st.composite
def mutated(draw, base):
    """A valid request with one thing wrong: a field gone, of another type, or junk added."""
    request = dict(draw(base))
    how = draw(st.sampled_from(["drop", "retype", "junk", "op", "none"]))
    keys = sorted(request)
    if how == "drop" and keys:
        request.pop(draw(st.sampled_from(keys)))
    elif how == "retype" and keys:
        request[draw(st.sampled_from(keys))] = draw(values)
    elif how == "junk":
        request[draw(st.text(max_size=8))] = draw(values)
    elif how == "op":
        request["op"] = draw(st.one_of(st.text(max_size=8), scalars))
    return request


# A message is ("map", request, id policy, frame mutation, envelope) or ("raw", bytes, envelope).
frame_mutations = st.one_of(
    st.just(("none",)),
    st.just(("none",)),
    st.just(("none",)),
    st.just(("none",)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=4)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("pad"), st.integers(MAX_BYTES + 1, 2 * MAX_BYTES - 64)),  # over the limit, under ZeroMQ's cap
)
envelopes = st.one_of(st.just([]), st.just([]), st.just([]), st.just([b""]),
                      st.lists(st.binary(max_size=6), min_size=1, max_size=5),
                      st.lists(st.integers(MAX_BYTES, 2 * MAX_BYTES).map(lambda n: b"e" * n), min_size=1, max_size=4))
messages = st.one_of(
    st.tuples(st.just("map"), requests, st.sampled_from(["id", "id", "id", "none", "odd"]), frame_mutations, envelopes),
    st.tuples(st.just("map"), mutated(requests), st.sampled_from(["id", "id", "none", "odd"]), frame_mutations,
              envelopes),
    st.tuples(st.just("raw"), values.map(lambda v: msgpack.packb(v, use_bin_type=True)), envelopes),
    st.tuples(st.just("raw"), st.binary(max_size=64), envelopes),
)


def mutate_frame(frame: bytes, how: tuple) -> bytes:
    kind = how[0]
    if kind == "truncate":
        return frame[: int(len(frame) * how[1])]
    if kind == "flip":
        data = bytearray(frame)
        for where, bit in how[1]:
            if data:
                data[min(int(where * len(data)), len(data) - 1)] ^= 1 << bit
        return bytes(data)
    if kind == "insert":
        at = int(len(frame) * how[1])
        return frame[:at] + how[2] + frame[at:]
    if kind == "append":
        return frame + how[1]
    if kind == "pad":
        return frame + b"\xa0" * (how[1] - len(frame)) if len(frame) < how[1] else frame
    return frame


def expected_id(frame: bytes, envelope: list[bytes]):
    """What the reply's `id` must be: the request's if it can be read, else nil (docs/protocol.md)."""
    if len(frame) > MAX_BYTES or not echoed(envelope):
        return None
    try:
        request = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        return None
    rid = request.get("id") if isinstance(request, dict) else None
    return rid if rid is None or type(rid) in (int, str, bytes, float, bool) else None


def echoed(envelope: list[bytes]) -> bool:
    """A DEALER's request alone, or behind one empty delimiter (as REQ sends it)."""
    return envelope in ([], [b""])


def same_id(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b or (a == b and not isinstance(a, float) and not isinstance(b, float)
                                             and isinstance(a, bool) == isinstance(b, bool))


def same_weights(d: Daemon, model, replay: Learner) -> None:
    """The daemon's checkpointed domains hold exactly the replay's weights and update counts."""
    with Client(d.endpoint) as c:
        saved = read_checked(c.save()["path"], STATE_FORMAT)
    assert sorted(saved["domains"]) == sorted(replay.domains)
    cfg, vocab = model.config, model.vocab
    for name, domain in replay.domains.items():
        theirs = weights_from_tensors(saved["domains"][name]["weights"], len(vocab), cfg.hidden, vocab.num_classes, name)
        for array in domain.weights.NAMES:
            np.testing.assert_array_equal(getattr(theirs, array), getattr(domain.weights, array), err_msg=name)
        assert saved["domains"][name]["updates"] == domain.updates


# --- the test --------------------------------------------------------------------------------------


def test_ten_thousand_fuzzed_messages_at_one_live_daemon(tmp_path, model_path):
    with Daemon(tmp_path, model_path, "--max-tokens", str(MAX_TOKENS), "--max-message-bytes", str(MAX_BYTES),
                "--max-domains", str(MAX_DOMAINS), "--max-streams", str(MAX_STREAMS), "--keep-checkpoints", "1",
                "--pull-bind", "tcp://127.0.0.1:0", state_dir=tmp_path / "state") as d:
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(d.endpoint)
        accepted: list[tuple[bytes, dict]] = []  # accepted score/reset requests, in order, with their replies
        sent_frames: list[list[bytes]] = []
        outcomes: dict[str, int] = {}
        next_id = iter(range(1, 10 ** 9))
        start = time.perf_counter()

        @seed(int(os.environ.get("FUZZ_SEED", "20250101")))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(messages, min_size=BATCH, max_size=BATCH))
        def batch(items):
            frames = []
            for item in items:
                if item[0] == "map":
                    _, request, id_policy, how, envelope = item
                    request = dict(request)
                    if id_policy == "id":
                        request["id"] = next(next_id)
                    elif id_policy == "odd":
                        request["id"] = [1, 2] if len(frames) % 2 else {"k": 1}  # not echoed: nil
                    frame = mutate_frame(msgpack.packb(request, use_bin_type=True), how)
                else:
                    _, frame, envelope = item
                frames.append([*envelope, frame])
            for parts in frames:
                dealer.send_multipart(parts)
            for parts in frames:
                assert dealer.poll(20_000), f"no reply to a request (after {len(sent_frames)} answered)"
                got = dealer.recv_multipart()
                envelope = parts[:-1]
                assert got[:-1] == (envelope if echoed(envelope) else []), "only a REQ delimiter comes back"
                reply = msgpack.unpackb(got[-1], raw=False)
                assert set(reply) >= {"v", "id", "ok"}, reply
                want = expected_id(parts[-1], envelope)
                assert same_id(reply["id"], want), (reply["id"], want, parts[-1][:80])
                code = "ok" if reply["ok"] else reply["error"]["code"]
                if not echoed(envelope):
                    assert code == "bad_request", reply
                assert code != "internal", (reply, parts[-1][:200])
                outcomes[code] = outcomes.get(code, 0) + 1
                if reply["ok"] and ("logprobs" in reply or "existed" in reply):
                    accepted.append((parts[-1], reply))
                sent_frames.append(parts)
            assert d.proc.poll() is None, d.output()

        batch()
        assert dealer.poll(300) == 0, "a reply too many"
        fuzz_seconds = time.perf_counter() - start
        total = len(sent_frames)
        assert total >= 10_000
        assert d.proc.poll() is None

        # Replay the accepted messages alone; the daemon must agree message by message and in its weights.
        model = load_model(model_path)
        replay = Learner(model, OnlineRule(lr=0.01), MAX_STREAMS, MAX_DOMAINS)
        learned = 0
        for frame, reply in accepted:
            request = protocol.parse(protocol.decode(frame), MAX_TOKENS)
            if request.op == "reset":
                assert replay.reset(request.domain, request.stream) == reply["existed"]
                continue
            result = replay.score(request)
            np.testing.assert_array_equal(np.array(reply["logprobs"]), result.logprobs)
            assert reply["learned"] == result.applied and reply["updates"] == result.domain.updates
            learned += result.applied
        same_weights(d, model, replay)
        assert learned > 0, "some fuzzed messages were valid and learned"

        # The same frames on the fire-and-forget socket: each handled once (counted), nothing dies.
        pull_before = sum(d.metric("rnnlm_messages_total", socket="pull", op=op, outcome=o)
                          for op in (*protocol.OPS, "unknown", "invalid") for o in outcomes)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(d.pull_endpoint)
        pushed = sent_frames[:1000]
        for parts in pushed:
            push.send_multipart(parts)
        push.close()

        def pull_count():
            text = d.scrape()
            return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                       if line.startswith('rnnlm_messages_total{') and 'socket="pull"' in line)

        deadline = time.monotonic() + 30
        while pull_count() - pull_before < len(pushed) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pull_count() - pull_before == len(pushed)
        with Client(d.endpoint) as c:
            assert c.ping()["pong"]
        # On PULL only a lone frame is a request, and only `score` is taken there.
        for parts in pushed:
            try:
                request = protocol.parse(protocol.decode(parts[-1]), MAX_TOKENS) if len(parts) == 1 and len(parts[-1]) <= MAX_BYTES else None
            except ProtocolError:
                continue
            if request is not None and request.op == "score":
                try:
                    replay.score(request)
                except NoRoom:  # too_many_domains: refused there too
                    pass
        same_weights(d, model, replay)
        dealer.close(0)
        assert d.stop() == 0, d.output()
        assert "Traceback" not in d.output()
    print(f"fuzzed {total:,} messages over one DEALER in {fuzz_seconds:.1f} s (+{len(pushed):,} on the PULL socket); "
          f"{len(accepted):,} accepted score/reset replayed ({learned:,} updates) with identical weights; "
          f"replies by outcome: {dict(sorted(outcomes.items(), key=lambda kv: -kv[1]))}")
