"""The fleet side of the daemon (`rnnlm serve --fleet`): which domains this member serves, and
with a fleet store, handing domains over when the members change (the rules: daemon/handoff.py).

`FleetMember` is a part of `Server` (server.py), kept here so that the server reads as the
lifecycle and dispatch of one daemon; its methods use the server's learner, workers, queue of
messages in hand, checkpoints and metrics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rnnlm.checkpoint import CheckpointError

from . import protocol
from .combination import describe_components, same_components, saved_fingerprints
from .fleet import Fleet, FleetError
from .learner import base_model_of
from .protocol import ProtocolError
from .state import reason_of

if TYPE_CHECKING:
    from .server import Message

log = logging.getLogger("rnnlm.daemon")

FLEET_LOOK_SECONDS = 2.0  # how often the fleet file is looked at for a change (a ConfigMap is swapped in place)
HANDOFF_LOOK_SECONDS = 0.05  # ...and the handoff folder, while a change is not settled


class FleetMember:
    """The fleet's part of Server: ownership checks, reloading the fleet, handing domains over."""

    # --- membership and ownership --------------------------------------------------------------

    def reload_fleet(self) -> None:
        """Read the fleet file again; a bad one keeps the fleet in force. Messages already taken in
        are answered by this member; from the next one on, the new owners are named. With a fleet
        store, the domains this member no longer owns are then handed over (`fleet_turn`)."""
        self.fleet_text = fleet_file_text(self.config.fleet)
        try:
            fleet = Fleet.read(self.config.fleet)
        except FleetError as err:
            log.error("received SIGHUP: could not reload the fleet, keeping the one in force: %s", err)
            return
        if sorted(fleet.names()) == sorted(self.fleet.names()):
            self.fleet = fleet  # the same members (an endpoint may have changed): no domain moves
            log.info("fleet file read again: the same %d member(s)", len(fleet.members))
            return
        me = self.config.fleet_name
        with self.learner.lock:  # workers may be creating domains
            known = list(self.learner.domains)
        gone = [d for d in known if self.fleet.owner(d).name == me and fleet.owner(d).name != me]
        before, self.fleet = self.fleet, fleet
        log.info("fleet of %d member(s) (%s); %d of this member's %d domain(s) now belong to others%s",
                 len(fleet.members), ", ".join(fleet.names()), len(gone), len(known),
                 f": {', '.join(map(protocol.spelled, gone))}" if gone else "")
        self.warn_if_not_a_member()
        if self.handoffs is not None:
            self.fleet_changed(before)

    def warn_if_not_a_member(self) -> None:
        if self.fleet.member(self.config.fleet_name) is None:
            log.warning("this daemon (--fleet-name %s) is not in the fleet file %s: it owns no domain and "
                        "redirects every request", self.config.fleet_name, self.config.fleet)

    def forwarded(self, message: Message, err: Exception, frame: bytes) -> bool:
        """A PULL score message for a domain another member owns goes on to the owner (fleet.Forwarder)."""
        if not (isinstance(err, ProtocolError) and err.code == "moved" and message.fire_and_forget
                and message.op in protocol.DATA_OPS and self.curve is None):
            return False
        return self.forwarder.send(err.details["endpoint"], frame)

    def check_owner(self, request: protocol.Request) -> None:
        """In a fleet, a domain that another member owns is answered `moved`, naming the owner."""
        owner = self.fleet.owner(request.domain)
        if owner.name != self.config.fleet_name:
            raise ProtocolError("moved", f"domain {protocol.spelled(request.domain)} is served by {owner.name} "
                                         f"at {owner.endpoint}", owner=owner.name, endpoint=owner.endpoint)

    def fleet_info(self) -> dict:
        if self.fleet is None:
            return {}
        me = self.config.fleet_name
        return {"fleet": {"member": me,
                          "members": [{"name": m.name, "endpoint": m.endpoint} for m in self.fleet.members],
                          "owned_domains": sorted(d for d in self.learner.domains if self.fleet.owner(d).name == me)}}

    # --- handoffs (handoff.py) ----------------------------------------------------------------

    def fleet_changed(self, before: Fleet | None) -> None:
        """A fleet is in force (at start, or a new one): hand over the domains this member no longer
        owns, and hold the messages of domains it owns but lacks until the change is settled."""
        self.handoffs.apply(before, self.fleet)
        me = self.config.fleet_name
        with self.learner.lock:
            self.giving = {d for d in self.learner.domains if self.fleet.owner(d).name != me}
        self.metrics.fleet(me, self.handoffs.generation, len(self.fleet.members))
        self.next_fleet_look = 0.0

    def fleet_turn(self) -> None:
        """Once a loop turn: reload a changed fleet file; hand over, take up and settle domains."""
        now = time.monotonic()
        h = self.handoffs
        look = now >= self.next_fleet_look
        if look:
            self.next_fleet_look = now + (FLEET_LOOK_SECONDS if h is None or h.settled else HANDOFF_LOOK_SECONDS)
            if fleet_file_text(self.config.fleet) != self.fleet_text:
                log.info("the fleet file %s changed", self.config.fleet)
                self.reload_fleet()
        if h is None:
            return
        if self.giving and not self.workers.runs_in_flight and not any(
                m.request is not None and m.request.domain in self.giving for m in self.in_hand):
            self.give_away(sorted(self.giving))
        if not self.giving and not h.announced:
            h.applied()
        if not h.settled and h.announced and look:
            look = h.settle(self.fleet, self.recover_from)
        if h.settled and look:  # files are taken only once every member has applied the change (handoff.py)
            self.take_handoffs()
        self.forget_taken_files()
        self.metrics.awaiting_handoff.set(0 if h.settled else 1)
        with self.learner.lock:
            self.metrics.fleet_owned.set(len(self.learner.domains))

    def must_wait(self, message: Message) -> bool:
        """Whether a message waits for its domain: owned here, not held, a fleet change unsettled."""
        h = self.handoffs
        if h is None or h.settled or message.request.domain in self.learner.domains:
            return False
        if message.waiting_since is None:
            message.waiting_since = time.perf_counter()
        return True

    def give_away(self, domains: list[str], fleet: Fleet | None = None) -> None:
        """Hand these domains over: a handoff file each, then forget them (and their series)."""
        fleet = fleet or self.fleet
        for name in domains:
            if name in self.learner.domains:
                to = fleet.owner(name).name
                started = time.perf_counter()
                try:
                    path = self.handoffs.give(self.learner, name, to)
                except Exception as err:  # a full disk: the domain stays here, tried again next turn
                    log.error("cannot hand domain %r over to %s: %s; keeping it and trying again", name, to,
                              reason_of(err))
                    return
                with self.learner.lock:
                    self.learner.drop_domain(name)
                self.workers.unassign(name)
                self.metrics.domain_gone(name)
                if path is not None:
                    self.metrics.handoffs.labels("given").inc()
                    log.info("domain %r handed over to %s in %.0f ms (%s)", name, to,
                             1000 * (time.perf_counter() - started), path.name)
            self.giving.discard(name)
        self.changed_since_checkpoint = True

    def take_handoffs(self) -> None:
        """Take up the handed-over domains this member owns (a stale copy is deleted instead)."""
        h = self.handoffs
        for name, files in h.to_take(self.learner, self.fleet).items():
            held = self.learner.domains.get(name)
            if held is not None and held.moves >= files[0].moves:
                h.discard(files)
                continue
            if held is not None and self.workers.runs_in_flight:
                continue  # a copy in use is replaced between messages
            started = time.perf_counter()
            try:
                payload = h.read(files[0])
                self.check_components(payload, str(files[0].path))
                with self.learner.lock:
                    self.learner.restore(payload, str(files[0].path), only={name})
            except Exception as err:
                log.error("cannot take domain %r over: %s", name, reason_of(err, files[0].path))
                continue
            h.took(name, files, self.checkpoint_seq)
            self.domain_arrived(name, "taken")
            log.info("domain %r taken over from %s in %.0f ms", name, payload.get("from"),
                     1000 * (time.perf_counter() - started))

    def recover_from(self, member: str) -> None:
        """The domains this member owns, from the newest checkpoint of a member that left unannounced."""
        found = self.handoffs.newest_checkpoint(member)
        if found is None:
            log.warning("member %s left no checkpoint to recover domains from", member)
            return
        payload, path = found
        me = self.config.fleet_name
        mine = set()
        for name, entry in payload.get("domains", {}).items():
            held = self.learner.domains.get(name)
            moves = entry.get("moves", 0) if isinstance(entry, dict) else 0
            if isinstance(name, str) and self.fleet.owner(name).name == me and (held is None or held.moves < moves):
                mine.add(name)
        if not mine:
            return
        try:
            if not same_model(base_model_of(payload, str(path)), self.learner.model):
                raise CheckpointError(f"{path}: adapted from another base model than this member's")
            self.check_components(payload, str(path))
            with self.learner.lock:
                self.learner.restore(payload, str(path), only=mine)
        except Exception as err:
            log.error("cannot recover domains from %s: %s", member, reason_of(err, path))
            return
        for name in sorted(mine):
            self.domain_arrived(name, "recovered")
        log.info("recovered %d domain(s) of %s from %s: %s", len(mine), member, path, ", ".join(map(repr, sorted(mine))))

    def domain_arrived(self, name: str, how: str) -> None:
        self.metrics.handoffs.labels(how).inc()
        self.note_domain(name)
        self.changed_since_checkpoint = True

    def check_components(self, payload: dict, where: str) -> None:
        ours = self.learner.combination.fingerprints if self.learner.combination is not None else []
        saved = saved_fingerprints(payload, where)
        if not same_components(saved, ours):
            raise CheckpointError(f"{where}: adapted with {describe_components(saved)}, but this member combines "
                                  f"{describe_components(ours)}")

    def forget_taken_files(self) -> None:
        last = self.state.last_path if self.state is not None else None
        if self.handoffs.taken and last is not None:
            self.handoffs.checkpointed(int(last.stem.split("-")[-1]), lambda name: name in self.learner.domains)

    def leave_fleet(self) -> None:
        """Stopping: hand every domain to its owner in the fleet without this member, so the others
        take them up at once when the fleet file drops it (or this member takes them back at restart)."""
        others = tuple(m for m in self.fleet.members if m.name != self.config.fleet_name)
        if not others:
            return
        without_me = Fleet(others)
        self.give_away(sorted(self.learner.domains), without_me)
        if not self.learner.domains:
            self.handoffs.apply(self.fleet, without_me)
            self.handoffs.applied()

    def refuse_in_hand(self) -> None:
        """Stopping with messages still waiting for a handoff that did not come: each gets an error."""
        while self.in_hand:
            message = self.in_hand.popleft()
            err = ProtocolError("unavailable", "this member is stopping before the domain was handed over to it; "
                                               "send this again (to the domain's owner)")
            self.deliver(message, *self.failure(message, err), 0.0)


def fleet_file_text(path: str | None) -> str | None:
    try:
        return Path(path).read_text() if path else None
    except (OSError, UnicodeDecodeError):
        return None  # looked at again later; a reload says why it cannot be read


def same_model(a, b) -> bool:
    return a.vocab.words == b.vocab.words and all(
        (x == y).all() for x, y in zip(a.weights.arrays().values(), b.weights.arrays().values()))
