"""`attnlab report`: a markdown table, PNG plots and a JSON file of per-run records for a set of training runs
(the runs of `attnlab sweep` manifests, or plain run directories), logged to the sweep's W&B group when online.

Modules: collect (reading manifests and run directories), stats (means and paired differences over seeds),
tables (the markdown), plots (the PNGs), cli (the subcommand, writing the files and the W&B logging).
"""
from __future__ import annotations


class ReportError(ValueError):
    """A report's input the user must fix (a missing directory, an unreadable manifest, an unknown baseline);
    the message is one line, ready to print."""


__all__ = ["ReportError"]
