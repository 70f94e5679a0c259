"""One decode step of a KV-cache layer: its time, the bytes it reads and the bytes its cache allocates, for a dense
cache and for SP-KV's pruned cache; per implementation of `softmax_decode` and per cache kind (K,V; K=V; K=V with
RoPE keys).

`attnlab bench decode --S 8192 32768 65536 --spkv-density 0.05 0.1 0.3 --impl xla --json out.json` builds, per
S, a cache holding S - 1 tokens and times the step that appends token S - 1 and reads the cache with it (the
cache buffers donated, so the append is in place, as in generation). Dense: S slots, all read. SP-KV: per
sequence and KV head a ring of the last `--spkv-window` tokens and a store of the older keys whose keep bit,
drawn at the density, is set, in pages of `--spkv-page` keys from one pool for the batch; the pool holds the
density plus `--spkv-headroom` of the older keys per (sequence, KV head) on average, each pair's share rounded up
to whole pages (pairs take pages in order while the cache is built; keys past the pool are dropped), and the
step reads each pair's held ring slots and pages only. The caches of one S, implementation and cache kind are
timed in interleaved rounds (a step of each per round).

One JSON row per (S, implementation, cache kind, cache): S, cache (dense | spkv), density (1 for dense),
cache_bytes (every array the cache allocates: keys, values and, for SP-KV, positions, scores, admission bits,
the page table and counts), held_bytes (the keys and values held), read_bytes (what the step must read: the held
keys and values, their positions when keys are rotated, the page table entries of the held pages), step_ms
(median), GBps = read_bytes / time and, on a GPU, its share of the device's peak HBM bandwidth. "K=V+rope" is the
projection-sharing paper's setting with RoPE: the cache holds the raw shared projection and keys are rotated at
each slot's position.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from attention import ops, pruned_cache
from lm.bench import add_decode_arguments
from lm.bench.step import machine

# Peak HBM bandwidth (bytes/s) of the accelerators the project targets, from the vendors' data sheets.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
KV_MODES = ("K,V", "K=V", "K=V+rope")
ROPE_THETA = 1e4


def peak_bandwidth() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((bw for name, bw in PEAK_BANDWIDTH.items() if name in kind), None)


def _tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _normal(rng, shape, dtype) -> jax.Array:
    """Standard normal draws made on the device (a long cache drawn on the host would take longer than the run)."""
    return jax.random.normal(jax.random.PRNGKey(int(rng.integers(2 ** 31))), shape, dtype)


def dense_cache(rng, B, S, Hkv, D, dtype, names) -> dict:
    """Keys (and values) of S slots; slots 0 .. S-2 hold tokens 0 .. S-2."""
    return {n: _normal(rng, (B, S, Hkv, D), dtype) for n in names}


def spkv_cache(rng, B, S, Hkv, D, dtype, names, *, density, window, headroom, page) -> dict:
    """A pruned cache after tokens 0 .. S-2: each ring holds the last `window` of them, each pair's store the
    older keys whose keep bit, drawn at `density`, is set, in pages of `page` handed out pair after pair from a
    pool of density x (1 + headroom) of the older keys per pair (keys past the pool are dropped)."""
    older = S - 1 - window
    capacity = pruned_cache.store_slots(min(density * (1 + headroom), 1.0), window, S)
    cache = pruned_cache.init(B, Hkv, {n: D for n in names}, dtype, ring=window, capacity=capacity,
                              older=S - window, page=page)
    pos = np.full((B, window, Hkv), -1, np.int32)
    ring_pos = np.arange(older, S - 1)
    pos[:, ring_pos % window, :] = ring_pos[None, :, None]
    n_pages, width = cache["page_pos"].shape[0], cache["table"].shape[-1]
    page_pos = np.full((n_pages, page), -1, np.int32)
    table = np.full((B, Hkv, width), -1, np.int32)
    owner = np.full((n_pages,), -1, np.int32)
    stored = np.zeros((B, Hkv), np.int32)
    used = 0
    for b in range(B):
        for h in range(Hkv):
            kept = np.flatnonzero(rng.random(older) < density)
            take = min(-(-len(kept) // page), n_pages - used, width)
            kept = kept[:take * page]
            ids = np.arange(used, used + take)
            table[b, h, :take], owner[ids] = ids, b * Hkv + h
            page_pos[ids] = np.pad(kept, (0, take * page - len(kept)), constant_values=-1).reshape(take, page)
            stored[b, h], used = len(kept), used + take
    cache.update({n: _normal(rng, (B, window, Hkv, D), dtype) for n in names})
    cache["pages"] = {n: _normal(rng, (n_pages, page, D), dtype) for n in names}
    cache.update(pos=jnp.asarray(pos), score=_normal(rng, pos.shape, jnp.float32), page_pos=jnp.asarray(page_pos),
                 page_score=_normal(rng, page_pos.shape, jnp.float32), table=jnp.asarray(table),
                 owner=jnp.asarray(owner), used=jnp.int32(used), stored=jnp.asarray(stored))
    return cache


def make_step(impl: str, mode: str, pruned: bool):
    """step(cache, q, k, v, position, positions) -> (cache, o): append token `position` and read the cache with
    its query. `positions` [B,S,Hkv] are the dense cache's slot positions (an argument, so XLA cannot fold the
    rotation tables); a pruned cache records its own."""
    shared, theta = mode != "K,V", ROPE_THETA if mode == "K=V+rope" else None

    def step(cache, q, k, v, position, positions):
        entries = {"k": k} if shared else {"k": k, "v": v}
        B, Hkv = k.shape[0], k.shape[2]
        pages = None
        if pruned:
            no = jnp.zeros((B, Hkv), bool)  # never admitted: repeated steps leave the store as built
            cache = pruned_cache.append(cache, entries, position, score=jnp.zeros((B, Hkv)), admit=no)
            lengths, positions = pruned_cache.ring_lengths(cache, position), cache["pos"]
            pages = pruned_cache.key_pages(cache, "k" if shared else "v")
        else:
            cache = {n: jax.lax.dynamic_update_slice_in_dim(cache[n], e.astype(cache[n].dtype), position, axis=1)
                     for n, e in entries.items()}
            lengths = jnp.full((B, Hkv), position + 1, jnp.int32)
        keys = cache["k"]
        o = ops.softmax_decode(q, keys, keys if shared else cache["v"], lengths=lengths, pages=pages, impl=impl,
                               key_rope_theta=theta, key_positions=positions if theta else None)
        return cache, o

    return jax.jit(step, donate_argnums=0)


class Timed:
    """One cache and its step; `once()` runs a step on the cache the last one returned and gives its seconds."""

    def __init__(self, step, cache, args):
        self.step, self.cache, self.args, self.times = step, cache, args, []

    def once(self) -> float:
        t = time.perf_counter()
        self.cache, o = self.step(self.cache, *self.args)
        jax.block_until_ready(o)
        return time.perf_counter() - t


def interleaved_ms(timed: list[Timed], reps: int) -> list[float]:
    """Median milliseconds of each cache's step over `reps` rounds, one step of each cache per round (so drift on
    a shared machine hits them alike), after a warm-up step each (compilation)."""
    for t in timed:
        t.once()
    for _ in range(reps):
        for t in timed:
            t.times.append(t.once())
    return [statistics.median(t.times) * 1e3 for t in timed]


def figures(cache: dict, S: int, mode: str, pruned: bool) -> dict:
    """cache_bytes (every array allocated), held_bytes (keys and values held) and read_bytes (what a step must
    read: the held keys and values, their int32 positions for rotated keys, a pruned store's page table entries of
    the pages held)."""
    B, _, Hkv = cache["k"].shape[:3]
    if pruned:
        held, entry = int(np.sum(np.asarray(pruned_cache.occupancy(cache)))), pruned_cache.entry_bytes(cache)
        page = cache["page_pos"].shape[1]
        table = 4 * int(np.sum(-(-np.asarray(cache["stored"]) // page)))
    else:
        held, entry, table = B * Hkv * S, sum(x.shape[-1] * x.dtype.itemsize for x in cache.values()), 0
    positions = 4 * held if mode == "K=V+rope" else 0
    return {"cache_bytes": _tree_bytes(cache), "held_bytes": held * entry,
            "read_bytes": held * entry + positions + table}


def run(a: argparse.Namespace) -> list[dict]:
    rows, peak = [], peak_bandwidth()
    B, Hq, Hkv, D, dtype = a.B, a.Hq, a.Hkv, a.D, jnp.dtype(a.dtype)
    caches = [("dense", 1.0)] + [("spkv", d) for d in a.spkv_density]
    for S in a.S:
        key = jax.random.PRNGKey(S)
        q = jax.random.normal(key, (B, 1, Hq, D), dtype)
        k, v = (jax.random.normal(jax.random.fold_in(key, i), (B, 1, Hkv, D), dtype) for i in (1, 2))
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :, None], (B, S, Hkv))
        for impl in a.impl:
            for mode in a.kv:
                names = ("k",) if mode != "K,V" else ("k", "v")
                group, timed = [], []
                for kind, density in caches:
                    rng = np.random.default_rng([S, round(density * 1e6)])
                    pruned = kind == "spkv"
                    cache = spkv_cache(rng, B, S, Hkv, D, dtype, names, density=density, window=a.spkv_window,
                                       headroom=a.spkv_headroom, page=a.spkv_page) if pruned else \
                        dense_cache(rng, B, S, Hkv, D, dtype, names)
                    row = {"op": f"softmax_decode[{impl}]", "kv": mode, "S": S, "cache": kind, "density": density,
                           "B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": dtype.name,
                           **figures(cache, S, mode, pruned)}
                    if pruned:
                        row |= {"window": a.spkv_window, "page": a.spkv_page,
                                "capacity": pruned_cache.slots_per_pair(cache)[1],
                                "held_per_head": float(np.mean(np.asarray(pruned_cache.occupancy(cache)))),
                                "unused_per_head": float(np.mean(np.asarray(pruned_cache.waste(cache))))}
                    group.append(row)
                    timed.append(Timed(make_step(impl, mode, pruned), cache, (q, k, v, jnp.int32(S - 1), positions)))
                try:
                    for row, ms in zip(group, interleaved_ms(timed, a.reps)):
                        row |= {"step_ms": ms, "GBps": row["read_bytes"] / ms / 1e6}
                        if peak:
                            row["peak_fraction"] = row["GBps"] * 1e9 / peak
                except Exception as e:  # noqa: BLE001  (an implementation that cannot run is reported)
                    for row in group:
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                del timed
                for row in group:
                    print(json.dumps(row), flush=True)
                rows += group
    return rows


DTYPES = ("float32", "bfloat16")


def check_arguments(a: argparse.Namespace) -> None:
    """UsageError naming the first argument the benchmark cannot run with."""
    from attention.ops import dispatch
    from lm.cli import UsageError

    impls = sorted(dispatch.implementations("softmax_decode"))
    unknown = [i for i in a.impl if i not in impls]
    if unknown:
        raise UsageError(f"--impl {' '.join(unknown)}: softmax_decode has no such implementation (it has "
                         f"{', '.join(impls)})")
    if a.dtype not in DTYPES:
        raise UsageError(f"--dtype {a.dtype}: the decode benchmark runs {' or '.join(DTYPES)}")
    for name in ("S", "B", "Hq", "Hkv", "D", "reps"):
        values = getattr(a, name)
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            raise UsageError(f"--{name} must be at least 1, got {values}")
    if a.Hq % a.Hkv:
        raise UsageError(f"--Hq {a.Hq} is not a multiple of --Hkv {a.Hkv} (each kv head serves Hq/Hkv query heads)")


def check_spkv_arguments(a: argparse.Namespace) -> None:
    """UsageError naming the first SP-KV cache argument the benchmark cannot run with."""
    from lm.cli import UsageError

    bad = [d for d in a.spkv_density if not 0 < d <= 1]
    if bad:
        raise UsageError(f"--spkv-density {' '.join(map(str, bad))}: a density is the kept share of the older keys, "
                         f"in (0, 1]")
    if a.spkv_density and not 1 <= a.spkv_window < min(a.S) - 1:
        raise UsageError(f"--spkv-window {a.spkv_window}: the window must be at least 1 and leave older keys at the "
                         f"shortest --S {min(a.S)}")
    if a.spkv_headroom < 0:
        raise UsageError(f"--spkv-headroom {a.spkv_headroom}: the store's room beyond the density cannot be negative")
    if a.spkv_page < 1:
        raise UsageError(f"--spkv-page {a.spkv_page}: a page holds at least one key")


def bench(a: argparse.Namespace, command: str) -> list[dict]:
    check_arguments(a)
    check_spkv_arguments(a)
    rows = run(a)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({**machine(), "command": command, "rows": rows}, f, indent=1)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_decode_arguments(p)
    bench(p.parse_args(argv), " ".join(sys.argv[1:]) if argv is None else " ".join(argv))


if __name__ == "__main__":
    main()
