"""What each host has installed ([Q]): match a report to versions, judge a host, gate a step.

Pure: digests, states and the clock come in as arguments (the store reads them).  A host's
files are compared with the *current* generation's: a host is `current` when every file of
its role is byte for byte the current one, whatever version its pillar last carried.

Per file: `current` (the current bytes), `old` (the bytes of an older version: not yet
installed, or restored from a backup), `modified` (bytes no version pkisvc knows had: a hand
edit) or `missing`.  A host's state, the first that applies: `expired` (no sign of it, pillar
request or report, for `hosts.expire_after`: gates leave it out), `unreported` (known from
its deliveries, never reported), `silent` (no report for `hosts.silent_after`), `drifted`
(a file modified or missing), `behind` (a file old), `current`.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping

from pkisvc.model import Installed, InstalledFile, MinionState, format_time

STATES = ("current", "behind", "drifted", "silent", "unreported", "expired")
DRIFT = ("modified", "missing")
# Where the README explains the master's side of reports: named by every gate refusal that
# involves a host that never reported.
README_POINTER = "README.md, 'Host reports'"
MATCH_WINDOW = 32  # versions (newest first) a reported file is matched against

Digests = Mapping[str, str]  # host file name -> lowercase hex sha256 of its bytes


def digests(files: Mapping[str, bytes]) -> dict[str, str]:
    """The sha256 of each host file's bytes."""
    return {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}


def match(reported: Mapping[str, str | None], role_files: Iterable[str],
          versions: Iterable[tuple[int, Digests]]) -> tuple[dict[str, InstalledFile], int | None]:
    """Match reported sha256s (None: missing) to versions, newest first.

    Returns (per role file: its digest and the newest version holding those bytes; the newest
    version whose role files all equal the host's, or None).  Files of other roles are not
    kept.
    """
    names = sorted(role_files)
    found: dict[str, InstalledFile] = {}
    whole: int | None = None
    pending = {n: reported.get(n) for n in names}
    for version, table in versions:
        for n in names:
            if n not in found and pending[n] is not None and table.get(n) == pending[n]:
                found[n] = InstalledFile(pending[n], version)
        if whole is None and names and all(table.get(n) == pending[n] for n in names):
            whole = version
    return ({n: found.get(n, InstalledFile(pending[n], None)) for n in names}, whole)


def file_status(held: InstalledFile | None, expected: str) -> str:
    if held is None or held.sha256 is None:
        return "missing"
    if held.sha256 == expected:
        return "current"
    return "old" if held.version is not None else "modified"


def last_seen(state: MinionState) -> datetime:
    """The latest sign of a host: a pillar request or a report."""
    if state.installed is not None and state.installed.reported > state.asked:
        return state.installed.reported
    return state.asked


def facts(state: MinionState, *, current: int, expected: Digests) -> dict[str, Any]:
    """What a host's record says against the current version (no clock: cacheable while
    neither changes); expected: its role's current digests.  `label` adds the state."""
    inst: Installed | None = state.installed
    files: dict[str, dict[str, Any]] = {}
    for name, want in sorted(expected.items()):
        held = inst.files.get(name) if inst is not None else None
        files[name] = {"sha256": held.sha256 if held else None,
                       "version": held.version if held else None, "expected": want,
                       "status": file_status(held, want) if inst is not None else "unknown"}
    return {
        "minion": state.minion, "role": state.role, "state": "", "current": current,
        "delivered": {"version": state.version, "received": format_time(state.received),
                      "asked": format_time(state.asked)},
        "installed": None if inst is None else {
            "version": inst.version, "reported": format_time(inst.reported),
            "state": inst.state, "result": inst.result, "reporter": inst.reporter},
        "files": files,
        "drift": [{"file": n, **f} for n, f in files.items() if f["status"] in DRIFT],
        "last_seen": format_time(last_seen(state)),
    }


def verdict(found: Mapping[str, Any]) -> str:
    """What a reported host's files say, clock aside: drifted, behind or current."""
    if found["drift"]:
        return "drifted"
    if any(f["status"] != "current" for f in found["files"].values()):
        return "behind"
    return "current"


def label(files_say: str, state: MinionState, *, silent_before: datetime,
          expire_before: datetime) -> str:
    """A host's state (the module's docstring); files_say: its `verdict`; the two times:
    now less `hosts.silent_after` and less `hosts.expire_after`."""
    if last_seen(state) < expire_before:
        return "expired"
    if state.installed is None:
        return "unreported"
    if state.installed.reported < silent_before:
        return "silent"
    return files_say


def turns(state: MinionState, *, silent_after: timedelta, expire_after: timedelta
          ) -> tuple[datetime, ...]:
    """When the clock alone moves a host's `label`: silent, then expired."""
    seen = last_seen(state) + expire_after
    if state.installed is None:
        return (seen,)
    return (state.installed.reported + silent_after, seen)


def behind(views: Iterable[Mapping[str, Any]], affected: Iterable[str]) -> list[dict[str, str]]:
    """Hosts a step must wait for: not expired, holding an affected file, and not holding the
    current bytes of every file of their role.  Each: minion, role, why (one line)."""
    touched = set(affected)
    out = []
    for v in views:
        if v["state"] == "expired" or not touched & set(v["files"]):
            continue
        if v["installed"] is None:
            why = f"never reported (set up the master's reports: {README_POINTER})"
        else:
            late = [f"{n} {_held(f)}" for n, f in v["files"].items() if f["status"] != "current"]
            if not late:
                continue
            why = (f"has not installed version {v['current']}: " + ", ".join(late)
                   + f" (reported {v['installed']['reported']})")
        out.append({"minion": v["minion"], "role": v["role"] or "", "why": why})
    return out


def _held(f: Mapping[str, Any]) -> str:
    if f["status"] == "old":
        return f"is version {f['version']}'s"
    if f["status"] == "missing":
        return "is missing"
    return f"was changed by hand (sha256 {str(f['sha256'])[:16]}..., expected " \
           f"{f['expected'][:16]}...)"


def refusal(step: str, hosts: list[dict[str, str]]) -> str:
    """The one-line message of a gate's refusal."""
    shown = "; ".join(f"{h['minion']} ({h['role']}) {h['why']}" for h in hosts[:20])
    more = f"; and {len(hosts) - 20} more" if len(hosts) > 20 else ""
    return (f"{step} refused: {len(hosts)} host(s) have not installed the current phase: "
            f"{shown}{more} (force overrides, audited)")
