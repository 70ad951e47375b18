"""Values read from a remote backend, served from memory within a bound (issue 18, [O]).

`Kept` holds one value the store reads on hot paths (the latest version, the tokens list) and
serves it without a backend round trip while it was confirmed less than `ttl` seconds ago:
"confirmed at t" means a read that *started* at t returned it, so a served value is never
older than the bound.  Past the bound the next caller reads again (one caller at a time; the
others wait for that read).  `Watcher` — a daemon thread in each serving process — re-reads
the values in use every `ttl / 2`, so request threads almost never wait.  A process that makes
a change tells its own values at once (`learn`, `expire`).

When a read fails because the backend cannot be reached (`BackendUnavailable`, not a
refusal), the value last confirmed is served for up to `stale_for` seconds after its
confirmation, with its age (`Seen.stale`): callers mark such answers as stale.  Until a read
succeeds again, callers get the stale value without asking (the watcher keeps asking), so
an outage costs a request no timeout.

A value that is costly to read and read only now and then (the minions' states: dozens of
secrets) is not polled: with `ahead`, a `get` that finds it past half the bound serves it and
starts the re-read in the background, so its cost follows the requests, not the clock.  A
change this process made is applied to the value held (`amend`) without confirming the rest.

`ttl == 0` keeps strict reads: every `get` asks the backend.  Only `store.py` uses this.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pkisvc.errors import BackendUnavailable, PermissionDenied

log = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_AFTER = 30.0  # seconds without a `get` after which a value is re-read only ...
IDLE_POLL = 10.0  # ... this often (its confirmation stays recent enough to serve stale)


@dataclass(frozen=True)
class Seen(Generic[T]):
    """A value as served: `stale` is None when confirmed within the bound, else the seconds
    since it was last confirmed (the backend could not be reached since)."""

    value: T
    stale: float | None = None


class Kept(Generic[T]):
    """One value read by `read`, served from memory within `ttl` of its confirmation."""

    def __init__(self, read: Callable[[], T], *, ttl: float, stale_for: float,
                 monotonic: bool = False, ahead: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._ahead = ahead  # re-read in the background past half the bound (see above)
        self.ttl = ttl
        self.stale_for = stale_for
        # A value that only grows (a version number): a newer reading never lowers it.
        self._monotonic = monotonic
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._value: T | None = None
        self._known = False
        self._confirmed = float("-inf")  # when the read that returned _value started
        self._failed: float | None = None  # when the last read that failed started
        self._reading = False
        self._epoch = 0  # bumped by expire(): a read started before it is not kept
        self.used = float("-inf")  # the last get(), for the watcher

    def get(self) -> Seen[T]:
        """Return the value: from memory within the bound, else read (or stale in an outage).

        Raises: what the read raises when nothing can be served in its place.
        """
        if self.ttl <= 0 and self.stale_for <= 0:
            # Read every time, nothing served in its place (the files backend): no read of
            # another caller to wait for, nor a failure to remember.  A hot read asks twice.
            now = self.used = self._clock()
            epoch = self._epoch
            value = self._read()
            if not self._monotonic:
                return Seen(value)
            with self._cond:
                self._keep(value, now, epoch)
                return Seen(self._value)  # type: ignore[arg-type]
        with self._cond:
            now = self.used = self._clock()
            if self.ttl > 0:
                while True:
                    if self._known and now - self._confirmed < self.ttl:
                        if self._ahead and not self._reading and (
                                now - self._confirmed >= self.ttl / 2):
                            self._read_behind(now, self._claim())
                        return Seen(self._value)  # type: ignore[arg-type]
                    if self._failing() and self._servable(now) and (
                            self._reading or now - self._failed < self.ttl):  # type: ignore[operator]
                        return self._stale(now)
                    if not self._reading:
                        break
                    self._cond.wait()
                    now = self._clock()
            claim = self._claim()
        return self._fetch(now, claim, serve_stale=True)

    def refresh(self) -> None:
        """Read again unless a read is under way (the watcher's call); a failure is kept."""
        with self._cond:
            if self._reading:
                return
            now, claim = self._clock(), self._claim()
        try:
            self._fetch(now, claim, serve_stale=False)
        except BackendUnavailable as e:
            log.debug("re-reading failed: %s", e.message)

    def _read_behind(self, now: float, claim: int) -> None:
        def read() -> None:
            try:
                self._fetch(now, claim, serve_stale=False)
            except Exception as e:  # the next caller past the bound reads (and raises) itself
                log.debug("re-reading ahead failed: %s", e)
        threading.Thread(target=read, name="pkisvc-read-ahead", daemon=True).start()

    def amend(self, change: Callable[[T], T]) -> None:
        """Apply a change this process made to the value held; its confirmation stays, and
        a read started before the change is not kept (it may miss the change)."""
        with self._cond:
            if self._known:
                self._value = change(self._value)  # type: ignore[arg-type]
            self._epoch += 1

    def learn(self, value: T, *, at: float) -> None:
        """Take a value this process read or wrote itself (a read or write started at `at`)."""
        with self._cond:
            self._keep(value, at, self._epoch)

    def expire(self) -> None:
        """Forget the value's freshness (this process changed it): the next get reads."""
        with self._cond:
            self._epoch += 1
            self._confirmed = float("-inf")
            self._failed = None

    def age(self) -> float:
        """Seconds since the value was last confirmed (inf: never)."""
        return self._clock() - self._confirmed

    def idle(self) -> float:
        """Seconds since the last get."""
        return self._clock() - self.used

    def _claim(self) -> int:
        """Mark a read under way (with the lock held); return the epoch it belongs to."""
        if self.ttl > 0:
            self._reading = True
        return self._epoch

    def _fetch(self, now: float, epoch: int, *, serve_stale: bool) -> Seen[T]:
        try:
            value = self._read()
        except BackendUnavailable as e:
            with self._cond:
                self._reading = False
                self._cond.notify_all()
                if isinstance(e, PermissionDenied):
                    raise  # a refusal is no outage: nothing is served in its place
                if epoch == self._epoch:
                    self._failed = now if self._failed is None else max(self._failed, now)
                later = self._clock()
                if serve_stale and self._servable(later):
                    log.debug("serving a value %.1fs old: %s", later - self._confirmed,
                              e.message)
                    return self._stale(later)
            raise
        except BaseException:
            with self._cond:
                self._reading = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._reading = False
            self._keep(value, now, epoch)
            self._cond.notify_all()
            if epoch != self._epoch:  # changed meanwhile: this caller asked before the change
                return Seen(value)
            return Seen(self._value)  # type: ignore[arg-type]

    def _keep(self, value: T, at: float, epoch: int) -> None:
        if epoch != self._epoch or (at < self._confirmed and not self._monotonic):
            return  # a read older than a change this process made, or than one kept already
        if self._monotonic and self._known and _below(value, self._value):
            value = self._value  # type: ignore[assignment]
        self._value, self._known = value, True
        self._confirmed = max(self._confirmed, at)

    def _failing(self) -> bool:
        return self._failed is not None and self._failed >= self._confirmed

    def _servable(self, now: float) -> bool:
        return self._known and now - self._confirmed < self.stale_for

    def _stale(self, now: float) -> Seen[T]:
        return Seen(self._value, max(now - self._confirmed, 0.0))  # type: ignore[arg-type]


def _below(new: object, old: object) -> bool:
    """Whether a newer reading of a growing value is lower than the one kept (None: empty)."""
    return (new or 0) < (old or 0)  # type: ignore[operator]


class Watcher:
    """A daemon thread per process that re-reads the values in use before they expire."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._values: weakref.WeakSet[Kept[object]] = weakref.WeakSet()
        self._pid: int | None = None
        self._lock = threading.Lock()

    def watch(self, kept: Kept[T]) -> None:
        self._values.add(kept)  # type: ignore[arg-type]

    def ensure_running(self) -> None:
        """Start the thread in this process if it is not running (after a fork, again)."""
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            self._pid = pid
            threading.Thread(target=self._run, name="pkisvc-freshness", daemon=True).start()

    def _run(self) -> None:
        while self._values:  # ends once the values' store is gone
            time.sleep(self.interval)
            self._round()

    def _round(self) -> None:
        for kept in list(self._values):
            busy = kept.idle() < IDLE_AFTER
            if kept.age() >= (self.interval if busy else IDLE_POLL):
                try:
                    kept.refresh()
                except Exception:  # never let the thread die: requests read themselves
                    log.exception("re-reading a kept value failed")
