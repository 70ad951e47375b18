"""Salt modules shipped with pkisvc; `salt_loader` is the `salt.loader` entry point.

Nothing here imports the rest of pkisvc: a Salt master loads these modules whether or not
the service is installed beside it.
"""
from __future__ import annotations

import os


def salt_loader() -> dict[str, list[str]]:
    """Tell Salt's loader where pkisvc's modules are: the ext_pillar, and the runner
    `pkisvc.rotate` that the kubernetes.cert.orch.rotate orchestration calls."""
    here = os.path.dirname(os.path.abspath(__file__))
    return {"pillar": [here], "runners": [os.path.join(here, "runners")]}


def formula_path() -> str:
    """The directory to list in the Salt master's file_roots: it holds kubernetes/cert/ (the
    formula and its orchestration).  Installed, pkisvc/formula beside this package; in a
    checkout, formula/ beside ext_pillar/ — the same relative place."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "formula")
