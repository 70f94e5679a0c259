"""Fixtures shared with the lm tests: a small prepared token store."""
from tests.lm.conftest import small_store  # noqa: F401  (a fixture, found by name)
