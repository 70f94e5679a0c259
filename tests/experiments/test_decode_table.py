"""experiments/bench/decode_table.py: the results table of `attnlab bench decode --json` rows, each cache against
the dense cache of its S and cache kind."""
from experiments.bench.decode_table import table


def test_ratios_are_against_the_dense_row_of_the_same_length_and_kind():
    dense = {"S": 8192, "kv": "K,V", "B": 1, "cache": "dense", "density": 1.0, "cache_bytes": 4 << 20, "step_ms": 10.0}
    other = {**dense, "kv": "K=V", "cache_bytes": 2 << 20, "step_ms": 4.0}
    spkv = {**dense, "cache": "spkv", "density": 0.1, "capacity": 896, "held_per_head": 876.4,
            "unused_per_head": 36.25, "cache_bytes": 1 << 20, "step_ms": 2.5}
    lines = table([dense, other, spkv])
    assert lines[0].startswith("| S | cache kind | cache |") and len(lines) == 5
    assert lines[2] == "| 8192 | K,V | dense | 1 |  | 8192 |  | 4.0 | 1.000 | 10.0 | 1.000 |"
    assert lines[4] == "| 8192 | K,V | spkv | 0.1 | 896 | 876 | 36.2 | 1.0 | 0.250 | 2.5 | 0.250 |"
