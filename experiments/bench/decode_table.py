"""The markdown table of `attnlab bench decode --json FILE` rows: per S and cache kind, each cache's bytes and
step time against the dense cache of the same S and kind (timed in the same rounds).

    python -m experiments.bench.decode_table FILE.json [FILE.json ...]
"""
from __future__ import annotations

import json
import sys

COLUMNS = ("S", "cache kind", "cache", "density", "store slots", "held/head", "unused/head", "cache MB",
           "bytes × dense", "step ms", "step × dense")


def table(rows: list[dict]) -> list[str]:
    dense = {(r["S"], r["kv"], r.get("B")): r for r in rows if r["cache"] == "dense"}
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        d = dense[(r["S"], r["kv"], r.get("B"))]
        pruned = r["cache"] != "dense"
        cells = (r["S"], r["kv"], r["cache"], f"{r['density']:g}", r["capacity"] if pruned else "",
                 f"{r['held_per_head']:.0f}" if pruned else r["S"], f"{r['unused_per_head']:.1f}" if pruned else "",
                 f"{r['cache_bytes'] / 2**20:.1f}", f"{r['cache_bytes'] / d['cache_bytes']:.3f}",
                 f"{r['step_ms']:.1f}", f"{r['step_ms'] / d['step_ms']:.3f}")
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def main(argv: list[str]) -> None:
    for path in argv:
        doc = json.load(open(path))
        print(f"`{doc['command']}` ({doc['date']}, {doc['cpu']}, jax {doc['jax']}):\n")
        print("\n".join(table(doc["rows"])) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
