"""`pkisvc.freshness.Kept`: the bound on what a hot read may serve, on a clock we move."""
from __future__ import annotations

import pytest

from pkisvc.errors import BackendUnavailable, PermissionDenied
from pkisvc.freshness import Kept, Seen
from tests.conftest import wait_for


class Source:
    """What the backend answers, and how often it was asked; time moves only by hand."""

    def __init__(self, value):
        self.value = value
        self.reads = 0
        self.now = 100.0
        self.during_read = None  # something that happens while a read is under way

    def read(self):
        self.reads += 1
        if self.during_read:
            self.during_read()
        if isinstance(self.value, Exception):
            raise self.value
        return self.value

    def clock(self):
        return self.now


def kept(source, ttl=0.5, stale_for=60.0, monotonic=False):
    return Kept(source.read, ttl=ttl, stale_for=stale_for, monotonic=monotonic,
                clock=source.clock)


def test_a_value_is_served_from_memory_within_the_bound_and_read_again_after_it():
    src = Source(1)
    k = kept(src)
    assert k.get() == Seen(1) and src.reads == 1
    src.value, src.now = 2, src.now + 0.49
    assert k.get() == Seen(1) and src.reads == 1
    src.now += 0.02
    assert k.get() == Seen(2) and src.reads == 2


def test_ttl_zero_reads_every_time():
    src = Source(1)
    k = kept(src, ttl=0)
    for v in (1, 2, 3):
        src.value = v
        assert k.get() == Seen(v)
    assert src.reads == 3


def test_a_version_never_goes_back_when_an_older_read_lands_after_a_write():
    src = Source(4)
    k = kept(src, monotonic=True)
    k.learn(5, at=src.now)  # this process wrote version 5
    src.now += 1
    assert k.get() == Seen(5)  # the read said 4: started earlier than the commit was seen


def test_a_list_read_before_this_process_changed_it_is_not_kept():
    src = Source(["old"])
    k = kept(src)
    src.during_read = k.expire  # the revocation lands while the read is under way
    assert k.get().value == ["old"]
    src.during_read, src.value = None, ["new"]
    assert k.get().value == ["new"]  # asked again: the earlier answer was not kept


def test_an_outage_serves_the_last_value_marked_stale_until_stale_for():
    src = Source(7)
    k = kept(src, stale_for=30)
    k.get()
    src.value, src.now = BackendUnavailable("vault at x: cannot connect"), src.now + 10
    assert k.get() == Seen(7, stale=10.0)
    reads = src.reads
    src.now += 0.1
    assert k.get() == Seen(7, stale=pytest.approx(10.1))  # no second timeout within the bound
    assert src.reads == reads
    src.now += 25
    with pytest.raises(BackendUnavailable):
        k.get()
    src.value = 8
    assert k.get() == Seen(8)


def test_a_refusal_is_not_an_outage():
    src = Source(7)
    k = kept(src)
    k.get()
    src.value, src.now = PermissionDenied("permission denied on secret/data/x"), src.now + 1
    with pytest.raises(PermissionDenied):
        k.get()


def test_ahead_serves_at_once_and_reads_again_behind_past_half_the_bound():
    src = Source(1)
    k = Kept(src.read, ttl=0.5, stale_for=0, ahead=True, clock=src.clock)
    assert k.get() == Seen(1) and src.reads == 1
    src.value, src.now = 2, src.now + 0.2
    assert k.get() == Seen(1) and src.reads == 1  # under half the bound: nothing read
    src.now += 0.1
    assert k.get() == Seen(1)  # served from memory, and read again in the background
    wait_for(lambda: k.get() == Seen(2), 30, "the read behind")
    assert src.reads == 2


def test_a_change_this_process_made_is_served_at_once_and_an_older_read_not_kept():
    src = Source(["a"])
    k = kept(src)
    k.get()
    k.amend(lambda held: [*held, "b"])
    assert k.get() == Seen(["a", "b"]) and src.reads == 1  # its confirmation stays
    src.now += 1
    src.value = ["a", "b", "c"]
    src.during_read = lambda: k.amend(lambda held: [*held, "d"])  # lands while reading
    k.get()
    src.during_read = None
    assert k.get() == Seen(["a", "b", "c"]) and src.reads == 3  # not kept: asked again
