"""The linear-attention chunk pipeline's second driver: on TPU a sequential pass runs its chunks as the innermost
("arbitrary") grid axis with the state in VMEM scratch; interpreted on the CPU the default is the Triton driver (a
loop over chunks inside each program), which the parity table checks. Here the TPU driver runs interpreted on the
parity table's hardest cases (documents at and inside chunk boundaries, strong gates, initial states, ragged T)
against the token-by-token reference, outputs, final states and every gradient."""
from __future__ import annotations

import functools

import jax

from attention.ops.kda.pallas import kda_pallas
from attention.ops.lightning.pallas import lightning_pallas
from tests.kernels import kda_cases, lightning_cases

KDA_GRID = functools.partial(kda_pallas, sequential="grid")
LIGHTNING_GRID = functools.partial(lightning_pallas, sequential="grid")


def test_kda_tpu_driver_matches_reference():
    for case in ("main", "short"):
        x = kda_cases.case_inputs(case)
        _, final = kda_cases.CASES[case]
        got = kda_cases._forward_and_grads(x["q"], x["k"], x["v"], x["g"], x["beta"], x["h0"], x["seg"], x["do"],
                                           x["dS"], fn=KDA_GRID, final=final)
        kda_cases.compare(jax.device_get(got), jax.device_get(kda_cases.run("reference", case)), case)


def test_lightning_tpu_driver_matches_reference():
    for case in ("segments", "ragged", "one_token"):
        *arrays, seg = lightning_cases.case_arrays(case)
        got = lightning_cases.run_fn(LIGHTNING_GRID, *arrays, segment_ids=seg,
                                     opts=(("chunk", lightning_cases.CASES[case]["block"]),))
        lightning_cases.compare(jax.device_get(got), jax.device_get(lightning_cases.run("reference", case)), case)
