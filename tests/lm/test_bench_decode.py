"""`attnlab bench decode` with SP-KV caches: the pruned cache it builds at a density, the bytes it reports for dense
and pruned caches, and the arguments it refuses."""
from __future__ import annotations

import json

import numpy as np
import pytest

from attention import pruned_cache
from lm.bench.decode import figures, spkv_cache
from lm.cli import main


def test_spkv_cache_holds_the_window_and_the_kept_older_keys():
    S, W, B, H = 200, 16, 2, 3
    cache = spkv_cache(np.random.default_rng(0), B, S, H, 4, np.float32, ("k",), density=0.2, window=W,
                       headroom=0.5)
    capacity = cache["pos"].shape[1] - W
    assert capacity == int(np.ceil(0.2 * 1.5 * (S - W)))
    pos, stored = np.asarray(cache["pos"]), np.asarray(cache["stored"])
    older = S - 1 - W  # the cache holds tokens 0 .. S-2; the step appends S-1
    for p in range(older, S - 1):
        assert (pos[:, p % W] == p).all()
    for b in range(B):
        for h in range(H):
            kept = pos[b, W:W + stored[b, h], h]
            assert (np.diff(kept) > 0).all() and kept.max() < older and (pos[b, W + stored[b, h]:, h] == -1).all()
    # Drawn at 0.2 of 183 older keys: about 37 per head, well inside the capacity of 55.
    assert 20 < stored.mean() < 55 and stored.max() <= capacity
    np.testing.assert_array_equal(pruned_cache.lengths(cache, S - 1), W + stored)
    f = figures(cache, S, "K=V+rope", pruned=True)
    held = int((W + stored).sum())
    assert f["held_bytes"] == held * 4 * 4
    assert f["read_bytes"] == f["held_bytes"] + 4 * held + 4 * B * H * capacity  # positions, store scores


def test_bench_decode_rows_for_dense_and_spkv(tmp_path):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--S", "40", "--B", "1", "--Hq", "4", "--Hkv", "2", "--D", "16", "--dtype",
                 "float32", "--impl", "xla", "--kv", "K,V", "--reps", "1", "--spkv-density", "0.25",
                 "--spkv-window", "8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["S"], r["cache"], r["density"]) for r in rows] == [(40, "dense", 1.0), (40, "spkv", 0.25)]
    dense, spkv = rows
    assert all(r["step_ms"] > 0 and r["GBps"] > 0 for r in rows)
    assert dense["cache_bytes"] == dense["held_bytes"] == dense["read_bytes"] == 40 * 2 * 16 * 4 * 2
    # Ring 8 + store ceil(0.25 x 1.1 x 32) = 9 slots per head: K and V, int32 positions and fp32 scores per slot,
    # admission bits per ring slot, stored and evicted counts per head.
    assert spkv["window"] == 8 and spkv["capacity"] == 9
    assert spkv["cache_bytes"] == 17 * 2 * (16 * 4 * 2 + 4 + 4) + 8 * 2 + 2 * 4 * 2
    assert spkv["read_bytes"] == spkv["held_bytes"] + 9 * 2 * 4
    assert spkv["held_bytes"] == spkv["held_per_head"] * 2 * 16 * 4 * 2


@pytest.mark.parametrize("args, says", [
    (["--spkv-density", "0.1", "1.5"], "--spkv-density 1.5: a density is the kept share of the older keys"),
    (["--spkv-density", "0.1", "--spkv-window", "39"], "--spkv-window 39: the window must be at least 1 and leave"),
    (["--spkv-density", "0.1", "--spkv-window", "8", "--spkv-headroom", "-1"], "--spkv-headroom -1.0: the store's room"),
])
def test_bench_decode_refuses_bad_spkv_arguments(capsys, args, says):
    assert main(["bench", "decode", "--S", "40", "--B", "1", "--Hq", "4", "--Hkv", "2", "--D", "16", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {says}"), err
