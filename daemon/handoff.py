"""Moving domains between the members of a fleet, through a directory they all mount (--fleet-store).

    STORE/<member>/state-*.pt         each member's own checkpoints (its state directory)
    STORE/handoff/<key>.<moves>.pt    a domain given away, until a checkpoint of its new owner holds it
    STORE/done/<member>               the fleet generation this member has applied (given away what it
                                      no longer owns)

Why files on a shared volume: the same files serve a clean move and a crash. When a member dies,
its newest checkpoint is where its domains' state is, and the new owners read their domains out of
it; a member-to-member transfer would need that volume anyway. A PTB-size domain is a 16 MB file.

Every member follows the same three rules, with no coordinator:

1. Give. A member holding a domain it does not own (after a fleet change, at start, or when it
   stops) writes the domain and its streams to a handoff file and forgets them. `moves` counts a
   domain's moves and only grows: a stale copy (say, from a checkpoint taken before the domain was
   given away) has fewer, so it never replaces a newer one. Having given everything away, the
   member writes the generation it applied to done/<member>.
2. Take. Once the change is settled (rule 3), a member takes each handoff file of a domain it owns,
   unless the copy it holds has as many moves. Not before: a file still in the store may be one
   that the member it was given to has taken and goes on learning from until it, too, applies the
   change. The file is deleted once a checkpoint of the new owner holds the domain, so a crash in
   between loses nothing: the file is taken again at restart. Files that a member given up on
   (rule 3) writes late are ignored: its domains were recovered, and learned from, since.
3. Wait. A message for a domain the member owns and does not hold waits while the fleet change is
   not settled: until every other member has applied this generation, and each member that left
   has too or, after --handoff-wait, has had its domains recovered from its newest checkpoint. Once
   settled, a domain that no one held is a new one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rnnlm.atomic import write_text_atomic
from rnnlm.checkpoint import VERSION, CheckpointError, read_checked, write_atomic

from .config import member_state_dir
from .fleet import Fleet
from .learner import STATE_FORMAT, Learner

log = logging.getLogger("rnnlm.daemon")

HANDOFF_FORMAT = "rnnlm-domain-handoff"


def generation(fleet: Fleet) -> str:
    """What identifies a fleet's ownership: its member names (endpoints do not change owners)."""
    names = "\n".join(sorted(fleet.names())).encode()
    return hashlib.blake2b(names, digest_size=8).hexdigest()


def model_fingerprint(model) -> str:
    """Which base model a handoff's weights adapted: its vocabulary and weights, hashed."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\n".join(model.vocab.words).encode())
    for name, array in sorted(model.weights.arrays().items()):
        digest.update(name.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def domain_key(domain: str) -> str:
    return hashlib.blake2b(domain.encode(), digest_size=16).hexdigest()


@dataclass
class HandoffFile:
    path: Path
    key: str
    moves: int


@dataclass
class Handoffs:
    store: Path
    me: str
    wait_seconds: float
    generation: str = ""
    departed: dict[str, float] = field(default_factory=dict)  # member that left -> when to stop waiting for it
    settled: bool = True
    announced: bool = True  # done/<me> says the generation in force (rule 1 carried out)
    taken: dict[str, tuple[list[Path], int]] = field(default_factory=dict)  # domain -> files, checkpoint to wait for
    headers: dict[Path, tuple[str, str]] = field(default_factory=dict)  # file -> (domain, member that gave it)
    written_off: set[str] = field(default_factory=set)  # members given up on: their late files are stale
    base: str = ""  # model_fingerprint of the base model, set by the server

    def __post_init__(self):
        self.store = Path(self.store)
        for folder in (self.handoff_dir, self.done_dir):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def handoff_dir(self) -> Path:
        return self.store / "handoff"

    @property
    def done_dir(self) -> Path:
        return self.store / "done"


    # --- a fleet change ------------------------------------------------------------------------

    def apply(self, before: Fleet | None, after: Fleet) -> None:
        """A new fleet is in force: what this member waits for before a domain it lacks is new."""
        self.generation = generation(after)
        gone = set(before.names()) - set(after.names()) if before is not None else set()
        deadline = time.monotonic() + self.wait_seconds
        self.departed = {name: deadline for name in gone if name != self.me}
        self.written_off -= set(after.names())  # back in the fleet: what it gives from now on is current
        self.settled = self.announced = False

    def applied(self) -> None:
        """This member has given away what it does not own under the generation in force."""
        write_text_atomic(self.done_dir / self.me, self.generation + "\n")
        self.announced = True

    def done_by(self, member: str) -> bool:
        try:
            return (self.done_dir / member).read_text().strip() == self.generation
        except OSError:
            return False

    def settle(self, fleet: Fleet, recover) -> bool:
        """Whether the change in force is settled (rule 3); `recover(member)` takes a departed
        member's domains from its last checkpoint once its handoff is overdue."""
        if self.settled:
            return True
        now = time.monotonic()
        for member, deadline in list(self.departed.items()):
            if self.done_by(member):
                del self.departed[member]
            elif now >= deadline:
                log.warning("member %s left the fleet without handing its domains over within --handoff-wait "
                            "%.0f s: recovering the ones this member owns from its last checkpoint", member,
                            self.wait_seconds)
                recover(member)
                del self.departed[member]
                self.written_off.add(member)  # a handoff it writes after all would undo what was learned since
        others = [name for name in fleet.names() if name != self.me]
        self.settled = not self.departed and all(self.done_by(name) for name in others)
        if self.settled:
            log.info("fleet change settled: every member has handed over what it no longer owns")
        return self.settled

    # --- files ---------------------------------------------------------------------------------

    def files(self) -> list[HandoffFile]:
        found = []
        for path in self.handoff_dir.glob("*.pt"):
            key, _, moves = path.stem.partition(".")
            if moves.isdigit():
                found.append(HandoffFile(path, key, int(moves)))
        return found

    def give(self, learner: Learner, domain: str, to: str) -> Path | None:
        """Write one domain and its streams to a handoff file (rule 1); None when a newer copy is there."""
        moves = learner.domains[domain].moves + 1
        key = domain_key(domain)
        self.taken.pop(domain, None)  # the files it came in are older: its next owner deletes them
        if any(f.key == key and f.moves >= moves for f in self.files()):
            log.info("not giving domain %r (%d moves): a newer copy is in the store already", domain, moves - 1)
            return None
        payload = {"format": HANDOFF_FORMAT, "version": VERSION, "domain": domain, "from": self.me, "to": to,
                   "base": self.base, **learner.part_payload([domain])}
        payload["domains"][domain]["moves"] = moves
        path = self.handoff_dir / f"{key}.{moves}.pt"
        write_atomic(path, payload)
        self.headers[path] = (domain, self.me)
        return path

    def header(self, file: HandoffFile) -> tuple[str, str] | None:
        """The domain a file holds and the member that gave it (read once; torch maps the file,
        so only its small header is read)."""
        if file.path not in self.headers:
            try:
                payload = torch.load(file.path, map_location="cpu", weights_only=True, mmap=True)
                name, giver = (payload.get("domain"), payload.get("from")) if isinstance(payload, dict) else (None, None)
            except Exception as err:  # a file being replaced, or damaged: looked at again next time
                log.debug("cannot read %s yet: %s", file.path, err)
                return None
            if not isinstance(name, str) or domain_key(name) != file.key or not isinstance(giver, str):
                log.error("%s does not hold the domain its name says; leaving it alone", file.path)
                return None
            self.headers[file.path] = (name, giver)
        return self.headers[file.path]

    def to_take(self, learner: Learner, fleet: Fleet) -> dict[str, list[HandoffFile]]:
        """The files of domains this member owns, newest first, by domain, not yet taken."""
        by_domain: dict[str, list[HandoffFile]] = {}
        for file in self.files():
            header = self.header(file)
            if header is None or header[1] in self.written_off:
                continue
            name = header[0]
            if file.path in self.taken.get(name, ([], 0))[0] or fleet.owner(name).name != self.me:
                continue
            by_domain.setdefault(name, []).append(file)
        for files in by_domain.values():
            files.sort(key=lambda f: -f.moves)
        return by_domain

    def read(self, file: HandoffFile) -> dict:
        payload = read_checked(file.path, HANDOFF_FORMAT)
        if payload.get("domain") != self.headers[file.path][0] or list(payload.get("domains", {})) != [payload["domain"]]:
            raise CheckpointError(f"{file.path}: not the one domain its name says")
        if payload.get("base") != self.base:
            raise CheckpointError(f"{file.path}: adapted from another base model than this member's")
        return payload

    def took(self, domain: str, files: list[HandoffFile], checkpoint_seq: int) -> None:
        """Delete these files once a checkpoint numbered above `checkpoint_seq` is complete."""
        self.taken[domain] = ([f.path for f in files], checkpoint_seq)

    def checkpointed(self, seq: int, held) -> None:
        """A checkpoint numbered `seq` is complete: the files of domains it holds can go."""
        for domain, (paths, after) in list(self.taken.items()):
            if seq > after:
                if held(domain):
                    for path in paths:
                        path.unlink(missing_ok=True)
                del self.taken[domain]

    def discard(self, files: list[HandoffFile]) -> None:
        for file in files:
            file.path.unlink(missing_ok=True)

    # --- a member that left without handing over ------------------------------------------------

    def newest_checkpoint(self, member: str) -> tuple[dict, Path] | None:
        """The newest readable checkpoint of a member, as resume reads its own."""
        for path in sorted(member_state_dir(self.store, member).glob("state-*.pt"), reverse=True):
            try:
                return read_checked(path, STATE_FORMAT), path
            except Exception as err:
                log.warning("skipping %s: %s", path, err)
        return None
