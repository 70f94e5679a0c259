"""The linear-attention chunk pipeline under the accelerators' drivers: interpreted on the CPU every kernel loops
over the chunks inside each (batch, head) program (what the parity table checks); on GPU and TPU the parallel
kernels run a program per chunk (and sub-block), and on TPU the passes over chunks run them as the innermost,
sequential grid axis with the state in VMEM scratch (chunk_call.py). Here that layout, ("grid", "grid"), runs
interpreted on the parity table's hardest cases (documents at and inside chunk boundaries, strong gates, initial
states, ragged T) against the token-by-token reference: outputs, final states and every gradient."""
from __future__ import annotations

import functools

import jax

from attention.ops.kda.pallas import kda_pallas
from attention.ops.lightning.pallas import lightning_pallas
from tests.kernels import kda_cases, lightning_cases

KDA_GRID = functools.partial(kda_pallas, drivers=("grid", "grid"))
LIGHTNING_GRID = functools.partial(lightning_pallas, drivers=("grid", "grid"))


def test_kda_grid_drivers_match_reference():
    for case in ("main", "short"):
        x = kda_cases.case_inputs(case)
        _, final = kda_cases.CASES[case]
        got = kda_cases._forward_and_grads(x["q"], x["k"], x["v"], x["g"], x["beta"], x["h0"], x["seg"], x["do"],
                                           x["dS"], fn=KDA_GRID, final=final)
        kda_cases.compare(jax.device_get(got), jax.device_get(kda_cases.run("reference", case)), case)


def test_lightning_grid_drivers_match_reference():
    for case in ("segments", "ragged", "one_token"):
        *arrays, seg = lightning_cases.case_arrays(case)
        got = lightning_cases.run_fn(LIGHTNING_GRID, *arrays, segment_ids=seg,
                                     opts=(("chunk", lightning_cases.CASES[case]["block"]),))
        lightning_cases.compare(jax.device_get(got), jax.device_get(lightning_cases.run("reference", case)), case)
