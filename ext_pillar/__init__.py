"""Salt modules shipped with pkisvc; `salt_loader` is the `salt.loader` entry point.

Nothing here imports the rest of pkisvc: a Salt master loads these modules whether or not
the service is installed beside it.
"""
from __future__ import annotations

import os


def salt_loader() -> dict[str, list[str]]:
    """Tell Salt's loader where pkisvc's pillar module is (the `pillar` loader type)."""
    return {"pillar": [os.path.dirname(os.path.abspath(__file__))]}
