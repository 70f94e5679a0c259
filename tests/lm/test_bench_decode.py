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
    """Per pair the ring's last W tokens and the older keys drawn at the density, in increasing order, in whole
    pages of the shared pool handed out pair after pair; the pool holds density x 1.5 of the older keys per pair
    in pages of 8, so nothing drawn is dropped."""
    S, W, B, H, page = 200, 16, 2, 3, 8
    cache = spkv_cache(np.random.default_rng(0), B, S, H, 4, np.float32, ("k",), density=0.2, window=W,
                       headroom=0.5, page=page)
    share = -(-int(np.ceil(0.2 * 1.5 * (S - W))) // page) * page
    assert pruned_cache.slots_per_pair(cache) == (W, share)
    pos, stored = np.asarray(cache["pos"]), np.asarray(cache["stored"])
    older = S - 1 - W  # the cache holds tokens 0 .. S-2; the step appends S-1
    for p in range(older, S - 1):
        assert (pos[:, p % W] == p).all()
    _, held_pos, held = (np.asarray(x) for x in pruned_cache.dense_view(cache, S - 2))
    for b in range(B):
        for h in range(H):
            kept = held_pos[b, W:, h][held[b, W:, h]]
            assert len(kept) == stored[b, h] and (np.diff(kept) > 0).all() and kept.max() < older
    # Drawn at 0.2 of 183 older keys: about 37 per pair, well inside the share of 56.
    assert 20 < stored.mean() < 55 and int(cache["used"]) == int(np.sum(-(-stored // page)))
    np.testing.assert_array_equal(pruned_cache.occupancy(cache), W + stored)
    f = figures(cache, S, "K=V+rope", pruned=True)
    held = int((W + stored).sum())
    assert f["held_bytes"] == held * 4 * 4
    assert f["read_bytes"] == f["held_bytes"] + 4 * held + 4 * int(cache["used"])  # positions, table entries


def test_bench_decode_rows_for_dense_and_spkv(tmp_path):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--S", "40", "--B", "1", "--Hq", "4", "--Hkv", "2", "--D", "16", "--dtype",
                 "float32", "--impl", "xla", "--kv", "K,V", "--reps", "1", "--spkv-density", "0.25",
                 "--spkv-window", "8", "--spkv-page", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["S"], r["cache"], r["density"]) for r in rows] == [(40, "dense", 1.0), (40, "spkv", 0.25)]
    dense, spkv = rows
    assert all(r["step_ms"] > 0 and r["GBps"] > 0 for r in rows)
    assert dense["cache_bytes"] == dense["held_bytes"] == dense["read_bytes"] == 40 * 2 * 16 * 4 * 2
    # Ring 8 and a share of ceil(0.25 x 1.1 x 32) = 9 keys per pair, rounded up to 3 pages of 4: per pair K and V
    # and int32 positions and fp32 scores for 8 + 12 slots, admission bits of the ring, a table row of 6 pages (as
    # many as the pool has; 32 older keys would fill 8), stored and evicted counts; per page its owner; the count of
    # pages handed out.
    assert spkv["window"] == 8 and spkv["capacity"] == 12 and spkv["page"] == 4
    assert spkv["cache_bytes"] == 2 * (20 * (16 * 4 * 2 + 4 + 4) + 8 + 6 * 4 + 2 * 4) + 6 * 4 + 4
    assert spkv["held_bytes"] == spkv["held_per_head"] * 2 * 16 * 4 * 2
    assert 0 <= spkv["unused_per_head"] < 4  # the rest of each pair's last page


@pytest.mark.parametrize("args, says", [
    (["--spkv-density", "0.1", "1.5"], "--spkv-density 1.5: a density is the kept share of the older keys"),
    (["--spkv-density", "0.1", "--spkv-window", "39"], "--spkv-window 39: the window must be at least 1 and leave"),
    (["--spkv-density", "0.1", "--spkv-window", "8", "--spkv-headroom", "-1"], "--spkv-headroom -1.0: the store's room"),
    (["--spkv-density", "0.1", "--spkv-window", "8", "--spkv-page", "0"], "--spkv-page 0: a page holds at least one"),
])
def test_bench_decode_refuses_bad_spkv_arguments(capsys, args, says):
    assert main(["bench", "decode", "--S", "40", "--B", "1", "--Hq", "4", "--Hkv", "2", "--D", "16", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {says}"), err
