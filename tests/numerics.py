"""Shared numerics assertions: relative RMSE plus a max-abs bound, with readable failures."""
from __future__ import annotations

import numpy as np


def rel_rmse(actual, expected) -> float:
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    denom = np.sqrt(np.mean(e * e))
    num = np.sqrt(np.mean((a - e) ** 2))
    if denom == 0.0:
        return float(num)
    return float(num / denom)


def assert_close(actual, expected, *, rel: float = 1e-5, abs_max: float | None = None, name: str = "value"):
    """Fail unless rel-RMSE(actual, expected) <= rel and (if given) max|actual-expected| <= abs_max.

    Non-finite values anywhere fail the check (kernels poison outputs with NaN to catch unwritten tiles).
    """
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    assert np.isfinite(e).all(), f"{name}: the expected value has non-finite entries"
    bad = ~np.isfinite(a)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite entries, first at {np.argwhere(bad)[0].tolist()}"
    r = rel_rmse(a, e)
    m = float(np.max(np.abs(a - e))) if a.size else 0.0
    assert r <= rel, f"{name}: rel-RMSE {r:.3e} > {rel:.1e} (max abs err {m:.3e})"
    if abs_max is not None:
        where = np.unravel_index(np.argmax(np.abs(a - e)), a.shape)
        assert m <= abs_max, f"{name}: max abs err {m:.3e} > {abs_max:.1e} at {list(where)} (rel-RMSE {r:.3e})"
