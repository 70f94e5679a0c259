"""Every registered implementation of every op against its reference, on each op's table of parity cases.

The tables live beside this file (`<op>_cases.py`): the cases (shapes, options, edge cases), how to run one
through an implementation (outputs, final states, gradients) and how to compare. An implementation that is
registered with `attention.ops.dispatch` (xla today, the Pallas kernels as they land) enters this test
without a line changed here; an implementation's test-only options (small tiles) live in its table.
"""
from __future__ import annotations

import functools

import jax
import pytest

from attention.ops import dispatch
from tests.kernels import kda_cases, lightning_cases, softmax_cases, softmax_decode_cases

TABLES = {t.OP: t for t in (softmax_cases, softmax_decode_cases, kda_cases, lightning_cases)}


def _params():
    for op, table in TABLES.items():
        impls = sorted(set(dispatch.implementations(op)) - {"reference"})
        assert impls, f"{op} has no implementation besides its reference"
        for case in table.CASES:
            for impl in impls:
                yield pytest.param(op, case, impl, id=f"{op}-{case}-{impl}")


@functools.cache
def _reference(op, case):
    return jax.device_get(TABLES[op].run("reference", case))


@pytest.mark.parametrize("op, case, impl", list(_params()))
def test_matches_reference(op, case, impl):
    table = TABLES[op]
    table.compare(jax.device_get(table.run(impl, case)), _reference(op, case), case)


def test_every_op_has_a_table():
    assert set(dispatch.ops()) == set(TABLES), "an op registered with dispatch has no parity table in tests/kernels"
