"""Membership and rendezvous hashing of a fleet (daemon/fleet.py)."""

import subprocess
import sys

import pytest

from daemon.fleet import Fleet, FleetError, Member, moved_domains, weight

DOMAINS = [f"domain-{i}" for i in range(2000)]


def fleet_of(n: int) -> Fleet:
    return Fleet(tuple(Member(f"rnnlm-{i}", f"tcp://rnnlm-{i}.rnnlm:5555") for i in range(n)))


def test_parse_reads_names_and_endpoints_and_skips_comments():
    fleet = Fleet.parse("# the fleet\n\nrnnlm-0 tcp://10.0.0.1:5555  # first\n  rnnlm-1\ttcp://10.0.0.2:5555\n")
    assert fleet.members == (Member("rnnlm-0", "tcp://10.0.0.1:5555"), Member("rnnlm-1", "tcp://10.0.0.2:5555"))


@pytest.mark.parametrize("text, words", [
    ("", "at least one member"),
    ("a tcp://x:1\na tcp://y:2\n", "given twice: a"),
    ("a tcp://x:1 extra\n", "line 1: expected 'NAME ENDPOINT'"),
    ("a\n", "line 1: expected 'NAME ENDPOINT'"),
    ("a tcp://x:1\nb 10.0.0.2:5555\n", "line 2: '10.0.0.2:5555' is not an endpoint"),
])
def test_a_bad_fleet_file_says_what_is_wrong(tmp_path, text, words):
    path = tmp_path / "fleet"
    path.write_text(text)
    with pytest.raises(FleetError, match=words.replace("(", r"\(")) as err:
        Fleet.read(path)
    assert str(path) in str(err.value)


def test_an_unreadable_fleet_file_is_a_fleet_error(tmp_path):
    with pytest.raises(FleetError, match="cannot read the fleet file"):
        Fleet.read(tmp_path / "missing")


def test_the_owner_is_the_same_in_every_process():
    """The weight must not depend on Python's per-process hash salt: another interpreter agrees."""
    code = ("from daemon.fleet import weight; "
            "print(' '.join(str(weight(f'rnnlm-{i}', 'news')) for i in range(4)))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outputs == {" ".join(str(weight(f"rnnlm-{i}", "news")) for i in range(4)) + "\n"}


def test_domains_spread_evenly_over_the_members():
    fleet = fleet_of(4)
    counts = {name: 0 for name in fleet.names()}
    for domain in DOMAINS:
        counts[fleet.owner(domain).name] += 1
    assert all(abs(c - len(DOMAINS) / 4) < 0.1 * len(DOMAINS) / 4 for c in counts.values()), counts


def test_a_member_that_joins_takes_only_the_domains_it_now_owns():
    before, after = fleet_of(3), fleet_of(4)
    moves = moved_domains(before, after, DOMAINS)
    assert {new for _, new in moves.values()} == {"rnnlm-3"}  # nothing moves between the old members
    assert abs(len(moves) - len(DOMAINS) / 4) < 0.1 * len(DOMAINS) / 4


def test_a_member_that_leaves_gives_away_only_its_own_domains():
    before = fleet_of(4)
    after = Fleet(tuple(m for m in before.members if m.name != "rnnlm-1"))
    moves = moved_domains(before, after, DOMAINS)
    assert {old for old, _ in moves.values()} == {"rnnlm-1"}
    assert len(moves) == sum(before.owner(d).name == "rnnlm-1" for d in DOMAINS)
    # and its domains spread over the others instead of all landing on one
    assert len({new for _, new in moves.values()}) == 3


def test_the_owner_follows_the_name_not_the_address_or_the_order():
    fleet = fleet_of(3)
    readdressed = Fleet(tuple(Member(m.name, m.endpoint.replace("rnnlm:5555", "other:6000"))
                              for m in reversed(fleet.members)))
    assert all(fleet.owner(d).name == readdressed.owner(d).name for d in DOMAINS)
