"""attention.ops.kda beyond the parity table (tests/kernels/kda_cases.py): the reference recurrence against
hand arithmetic and an independent numpy gated delta rule, the bf16 path, dispatch and argument errors.

The tests reuse the parity table's main case (one batch, one scenario per row) and its compiled reference.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.ops import dispatch
from attention.ops.kda import kda
from attention.ops.kda.xla import CHUNK
from tests.kernels.kda_cases import GRADS, H, K, ROWS, T_MAIN, V, case_inputs, run_inputs
from tests.numerics import assert_close


@pytest.fixture(scope="module")
def main_inputs():
    return case_inputs("main")


@pytest.fixture(scope="module")
def main_results(main_inputs):
    return {"reference": jax.device_get(run_inputs(main_inputs, "reference"))}


def test_strong_gates_would_overflow_a_chunkwide_factorisation(main_inputs):
    chunk_sums = np.asarray(main_inputs["g"][1, :CHUNK]).sum(axis=0)
    assert chunk_sums.max() < -300


def _delta_rule_np(q, k, v, alpha, beta, scale, S0):
    """One head, float64, in the transition-matrix form of the gated delta rule:
    S_t = (I - beta_t k_t k_t^T) (alpha_t * S_{t-1}) + beta_t k_t v_t^T,  o_t = scale S_t^T q_t.
    alpha_t is a scalar (GDN) or a [K] vector applied per key row (KDA)."""
    S = np.array(S0, np.float64)
    eye = np.eye(S.shape[0])
    o = np.zeros((len(q), S.shape[1]))
    for t in range(len(q)):
        a_t = np.asarray(alpha[t], np.float64).reshape(-1, 1)
        S = (eye - beta[t] * np.outer(k[t], k[t])) @ (a_t * S) + beta[t] * np.outer(k[t], v[t])
        o[t] = scale * S.T @ q[t]
    return o, S


def test_reference_matches_separate_documents(main_inputs, main_results):
    """Packed rows equal running each document on its own, the initial state on the first only."""
    x = {n: np.asarray(a, np.float64) for n, a in main_inputs.items()}
    o_ref, S_ref, _ = main_results["reference"]
    for row in (2, 3, 4):
        ids = np.asarray(main_inputs["seg"][row])
        starts = [0] + [t for t in range(1, T_MAIN) if ids[t] != ids[t - 1]] + [T_MAIN]
        for h in range(H):
            S = x["h0"][row, h]
            for a, b in zip(starts[:-1], starts[1:]):
                sl = (row, slice(a, b), h)
                o, S = _delta_rule_np(x["q"][sl], x["k"][sl], x["v"][sl], np.exp(x["g"][sl]), x["beta"][sl],
                                      K ** -0.5, S if a == 0 else np.zeros((K, V)))
                assert_close(o_ref[sl], o, rel=1e-5, name=f"row {row} head {h} document [{a},{b})")
            assert_close(S_ref[row, h], S, rel=1e-5, name=f"row {row} head {h} final state")


def test_scalar_gate_is_the_gated_delta_rule(main_inputs):
    """g broadcast over K is GDN; both implementations against the numpy gated delta rule."""
    rng = np.random.default_rng(1)
    g_BTH = -np.logaddexp(0, -rng.standard_normal((len(ROWS), T_MAIN, H))) / 4
    g = jnp.broadcast_to(jnp.asarray(g_BTH, jnp.float32)[..., None], main_inputs["g"].shape)
    seg = jnp.zeros_like(main_inputs["seg"])  # same shapes as the parity run: no new compile
    x = {n: np.asarray(a, np.float64) for n, a in main_inputs.items()}
    for impl in ("reference", "xla"):
        o, S, _ = jax.device_get(run_inputs(main_inputs, impl, g=g, seg=seg))
        for row in (0, 3):
            for h in range(H):
                sl = (row, slice(None), h)
                o_np, S_np = _delta_rule_np(x["q"][sl], x["k"][sl], x["v"][sl], np.exp(g_BTH[row, :, h]),
                                            x["beta"][sl], K ** -0.5, x["h0"][row, h])
                assert_close(o[sl], o_np, rel=1e-5, name=f"{impl} o row {row} head {h}")
                assert_close(S[row, h], S_np, rel=1e-5, name=f"{impl} state row {row} head {h}")


def test_reference_two_tokens_by_hand():
    """K=2, V=1, default scale 2**-0.5. The decay comes before the error is read: with the error
    read first, token 1 would write -1 into S[0] and give o_1 = 7 * scale instead of 8 * scale."""
    q = jnp.array([[1.0, 1.0], [0.0, 1.0]])
    k = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    v = jnp.array([[2.0], [1.0]])
    g = jnp.log(jnp.array([[0.5, 1.0], [1.0, 0.5]]))
    beta = jnp.array([0.5, 1.0])
    S0 = jnp.array([[4.0], [6.0]])
    expand = lambda x: x[None, :, None]
    o, S = kda(expand(q), expand(k), expand(v), expand(g), expand(beta), initial_state=S0[None, None],
               output_final_state=True, impl="reference")
    # t=1: S' = diag(.5, 1) S0 = [2, 6]; error 2 - S'^T k1 = 0, so S1 = [2, 6]; o1 = 8 s.
    # t=2: S' = diag(1, .5) S1 = [2, 3]; error 1 - (.6*2 + .8*3) = -2.6;
    #      S2 = S' + k2 * -2.6 = [0.44, 0.92]; o2 = 0.92 s.
    s = 2 ** -0.5
    np.testing.assert_allclose(np.asarray(o)[0, :, 0, 0], [8 * s, 0.92 * s], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(S)[0, 0, :, 0], [0.44, 0.92], rtol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_bf16_inputs_against_fp32_reference(main_inputs, main_results, impl):
    """bf16 q, k, v, g, beta (state stays fp32) through xla or the kernels, against the fp32 reference on the
    unrounded inputs. xla computes in fp32, so its error is the inputs' bf16 rounding (relative 2**-9) carried
    through, plus o's and the gradients' own rounding to bf16: measured worst rel-RMSE over the scenario rows
    3.7e-3 for o, 3.0e-3 for the state, 8.4e-3 for the gradients (dg with the strong gates, where bf16 moves
    g = -6 by up to 1.6e-2 and dg itself is small). The kernels also round every matmul operand to bf16 (as tensor
    cores want; fp32 accumulation, fp32 states and triangular inverse): 5.4e-3 for o, 4.7e-3 for the state,
    4.6e-3 to 9.4e-3 for the gradients. The bounds leave a 1.8x-2.1x margin over the kernels."""
    bf16 = {n: main_inputs[n].astype(jnp.bfloat16) for n in ("q", "k", "v", "g", "beta")}
    o, S, d = jax.device_get(run_inputs(main_inputs, impl, **bf16))
    o_r, S_r, d_r = main_results["reference"]
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    for row in range(len(ROWS)):
        assert_close(o[row], o_r[row], rel=1e-2, name=f"o row {row}")
        assert_close(S[row], S_r[row], rel=1e-2, name=f"state row {row}")
        for name in GRADS:
            assert_close(d[name][row], d_r[name][row], rel=2e-2, name=f"{name} row {row}")


def test_auto_picks_xla_on_the_cpu_and_pallas_elsewhere(monkeypatch):
    def choose(backend, K, V):
        q = jnp.zeros((1, 4, 1, K))
        monkeypatch.setattr(dispatch, "backend", lambda: backend)
        label = f"test_kda_op.auto-{backend}-{K}-{V}"
        with dispatch.label_calls(label):
            jax.eval_shape(lambda: kda(q, q, jnp.zeros((1, 4, 1, V)), q, jnp.zeros((1, 4, 1)), impl="auto"))
        return {lb: c for lb, c in dispatch.choices() if c.op == "kda"}[label]

    for backend, K, V, want in (("cpu", 16, 16, "xla"), ("gpu", 16, 32, "pallas"), ("tpu", 128, 128, "pallas"),
                                ("gpu", 8, 32, "xla"), ("tpu", 128, 96, "xla"), ("gpu", 512, 128, "xla")):
        chosen = choose(backend, K, V)
        assert (chosen.requested, chosen.chosen) == ("auto", want), chosen.reason
        if want == "xla" and backend != "cpu":
            assert chosen.reason == ("the kda kernels take key and value dims that are powers of two from 16 to 256 "
                                     f"(got K={K}, V={V})")
    monkeypatch.undo()
    q = jnp.zeros((1, 4, 1, 8))
    o, _ = kda(q, q, q, q, jnp.zeros((1, 4, 1)), impl="pallas")   # interpreted on the CPU: any shape
    assert o.shape == (1, 4, 1, 8)


def _small(**overrides):
    B, T, Hs, Ks, Vs = 1, 3, 2, 4, 5
    x = dict(q=jnp.zeros((B, T, Hs, Ks)), k=jnp.zeros((B, T, Hs, Ks)), v=jnp.zeros((B, T, Hs, Vs)),
             g=jnp.zeros((B, T, Hs, Ks)), beta=jnp.zeros((B, T, Hs)))
    x.update(overrides)
    return x


@pytest.mark.parametrize("overrides, message", [
    (dict(q=jnp.zeros((1, 3, 8))), "q must be"),
    (dict(k=jnp.zeros((1, 3, 2, 6))), "k shape"),
    (dict(v=jnp.zeros((1, 4, 2, 5))), "v shape"),
    (dict(g=jnp.zeros((1, 3, 2, 1))), "g shape"),
    (dict(beta=jnp.zeros((1, 3, 2, 1))), "beta must have shape"),
    (dict(q=jnp.zeros((1, 3, 2, 4), jnp.int32)), "q must be floating"),
    (dict(g=jnp.full((1, 3, 2, 4), 0.1)), "g must be a log decay <= 0"),
    (dict(initial_state=jnp.zeros((1, 2, 5, 4))), "initial_state must have shape"),
    (dict(initial_state=jnp.zeros((1, 2, 4, 5), jnp.bfloat16)), "initial_state must be float32"),
    (dict(segment_ids=jnp.zeros((1, 4), jnp.int32)), "segment_ids must have shape"),
    (dict(segment_ids=jnp.zeros((1, 3))), "segment_ids must be integers"),
    (dict(scale=jnp.ones(2)), "scale must be a scalar"),
    (dict(impl="fast"), "impl='fast'"),
], ids=lambda p: p if isinstance(p, str) else None)
def test_argument_errors(overrides, message):
    x = _small(**overrides)
    with pytest.raises(ValueError, match=message):
        kda(x.pop("q"), x.pop("k"), x.pop("v"), x.pop("g"), x.pop("beta"), **x)
