"""The opening every hand-run results file shares: its title, the command that made it, the machine and versions.
(Sweeps of trainings are `attnlab sweep` specs under experiments/sweeps/, reported by `attnlab report`.)"""
from __future__ import annotations

import shlex
import sys

from lm.report.tables import provenance


def report_head(title: str, module: str) -> str:
    """The opening of a results file: title, the command that made it (`python -m module` with this
    process's arguments), machine and versions."""
    args = shlex.join(sys.argv[1:])  # quoted, so the line can be pasted back
    return f"# {title}\n\nCommand: `python -m {module} {args}`\n\nMachine: {provenance()}.\n\n"
