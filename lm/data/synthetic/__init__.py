"""Synthetic recall tasks (MQAR, selective copy), usable as `data.source: synthetic:<task>`."""
from lm.data.synthetic import dataset  # noqa: F401  (registers the tasks)
