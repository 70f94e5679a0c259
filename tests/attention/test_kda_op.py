"""attention.ops.kda: the reference recurrence against hand arithmetic and an independent numpy
gated delta rule; the chunked xla form against the reference (outputs, final state, every gradient).

Compiles dominate the runtime, so the parity cases share shapes: one batch holds several
scenarios, one per row (rows never interact, so each row's slice of every output and gradient is
that scenario's own), and every fp32 check on those shapes reuses the same two compiled programs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.ops import dispatch
from attention.ops.kda import kda
from attention.ops.kda.xla import CHUNK
from tests.numerics import assert_close

H, K, V = 2, 16, 32
T_MAIN = 130  # three chunks, the last one ragged
ROWS = ("moderate", "strong", "documents", "spanning", "long_memory")
GRADS = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _doc_ids(T, starts):
    ids = np.zeros(T, np.int32)
    for s in starts:
        ids[s:] += 1
    return ids


def _main_inputs():
    """One row per scenario, T=130, every row with an initial state and segment ids."""
    rng = np.random.default_rng(0)
    B = len(ROWS)
    q = _unit(rng.standard_normal((B, T_MAIN, H, K)))
    k = _unit(rng.standard_normal((B, T_MAIN, H, K)))
    v = rng.standard_normal((B, T_MAIN, H, V))
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T_MAIN, H))))
    logsig = -np.logaddexp(0, -rng.standard_normal((B, T_MAIN, H, K)))  # log sigmoid, < 0
    g = np.empty((B, T_MAIN, H, K))
    g[0] = logsig[0]
    # About -6 per token: a chunk's cumulative log decay reaches about -400, so exp(-Gamma) would
    # overflow fp32 in any chunk-wide factorisation.
    g[1] = -6.0 - 0.5 * np.abs(rng.standard_normal((T_MAIN, H, K)))
    g[2] = logsig[2]
    # Mixed: half the channels never decay (g = 0 exactly); the others mostly decay a little, with
    # rare -20 spikes, so small gates follow large ones inside a chunk.
    spikes = rng.random((T_MAIN, H, K)) < 0.05
    g[3] = np.where(spikes, -20.0, 0.05 * logsig[3])
    g[3][..., : K // 2] = 0.0
    g[4] = logsig[4] / 16
    seg = np.zeros((B, T_MAIN), np.int32)
    # Boundaries exactly at chunk starts (64, 128), mid-chunk (30, 100) and one-token documents
    # (100, 129).
    seg[2] = _doc_ids(T_MAIN, [30, 64, 100, 101, 128, 129])
    # Documents that start inside one chunk and run across the next chunk boundary.
    seg[3] = _doc_ids(T_MAIN, [50, 120])
    # Ids need not be unique or increasing: a run of equal ids is one document.
    seg[4] = np.repeat([7, 3, 7, 7], [40, 33, 20, 37])
    h0 = rng.standard_normal((B, H, K, V))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return dict(q=f32(q), k=f32(k), v=f32(v), g=f32(g), beta=f32(beta), h0=f32(h0),
                seg=jnp.asarray(seg), do=f32(rng.standard_normal((B, T_MAIN, H, V))),
                dS=f32(rng.standard_normal((B, H, K, V))))


@functools.partial(jax.jit, static_argnames=("impl", "final"))
def _forward_and_grads(q, k, v, g, beta, h0, seg, do, dS, *, impl, final):
    """o, final state and the gradients of sum(o*do) + sum(S*dS) w.r.t. every input."""
    primals = (q, k, v, g, beta) + (() if h0 is None else (h0,))

    def loss(*p):
        h = p[5] if len(p) > 5 else None
        o, S = kda(*p[:5], initial_state=h, output_final_state=final, segment_ids=seg, impl=impl)
        value = jnp.sum(o.astype(jnp.float32) * do)
        if final:
            value = value + jnp.sum(S * dS)
        return value, (o, S)

    (_, (o, S)), grads = jax.value_and_grad(loss, argnums=tuple(range(len(primals))), has_aux=True)(*primals)
    return o, S, dict(zip(GRADS, grads))


def _run(inputs, impl, *, final=True, **overrides):
    x = {**inputs, **overrides}
    return _forward_and_grads(x["q"], x["k"], x["v"], x["g"], x["beta"], x["h0"], x["seg"], x["do"],
                              x["dS"], impl=impl, final=final)


@pytest.fixture(scope="module")
def main_inputs():
    return _main_inputs()


@pytest.fixture(scope="module")
def main_results(main_inputs):
    return {impl: jax.device_get(_run(main_inputs, impl)) for impl in ("reference", "xla")}


def test_strong_gates_would_overflow_a_chunkwide_factorisation(main_inputs):
    chunk_sums = np.asarray(main_inputs["g"][1, :CHUNK]).sum(axis=0)
    assert chunk_sums.max() < -300


@pytest.mark.parametrize("row", range(len(ROWS)), ids=ROWS)
def test_xla_matches_reference(main_results, row):
    (o_r, S_r, d_r), (o_x, S_x, d_x) = main_results["reference"], main_results["xla"]
    assert_close(o_x[row], o_r[row], rel=1e-5, name="o")
    assert_close(S_x[row], S_r[row], rel=1e-5, name="final state")
    for name in GRADS:
        assert_close(d_x[name][row], d_r[name][row], rel=1e-5, name=name)


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
        o, S, _ = jax.device_get(_run(main_inputs, impl, g=g, seg=seg))
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


def test_without_state_or_segments_ragged():
    """T=100 (ragged), no initial state, no segments, no final state requested."""
    rng = np.random.default_rng(2)
    B, T = 2, 100
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    x = dict(q=f32(_unit(rng.standard_normal((B, T, H, K)))), k=f32(_unit(rng.standard_normal((B, T, H, K)))),
             v=f32(rng.standard_normal((B, T, H, V))), g=f32(-np.logaddexp(0, -rng.standard_normal((B, T, H, K)))),
             beta=f32(1 / (1 + np.exp(-rng.standard_normal((B, T, H))))), h0=None, seg=None,
             do=f32(rng.standard_normal((B, T, H, V))), dS=None)
    o_r, S_r, d_r = _run(x, "reference", final=False)
    o_x, S_x, d_x = _run(x, "xla", final=False)
    assert S_r is None and S_x is None
    assert_close(o_x, o_r, rel=1e-5, name="o")
    for name in GRADS[:-1]:
        assert_close(d_x[name], d_r[name], rel=1e-5, name=name)


def test_bf16_inputs_against_fp32_reference(main_inputs, main_results):
    """bf16 q, k, v, g, beta (state stays fp32) through xla, against the fp32 reference on the
    unrounded inputs. The op computes in fp32, so the error is the inputs' bf16 rounding (relative
    2**-9) carried through, plus o's and the gradients' own rounding to bf16. Measured worst
    rel-RMSE over the scenario rows: 3.7e-3 for o, 3.0e-3 for the state, 8.4e-3 for the gradients
    (dg with the strong gates, where bf16 moves g = -6 by up to 1.6e-2 and dg itself is small).
    The bounds leave a 2.4x-3.3x margin."""
    bf16 = {n: main_inputs[n].astype(jnp.bfloat16) for n in ("q", "k", "v", "g", "beta")}
    o, S, d = jax.device_get(_run(main_inputs, "xla", **bf16))
    o_r, S_r, d_r = main_results["reference"]
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    for row in range(len(ROWS)):
        assert_close(o[row], o_r[row], rel=1e-2, name=f"o row {row}")
        assert_close(S[row], S_r[row], rel=1e-2, name=f"state row {row}")
        for name in GRADS:
            assert_close(d[name][row], d_r[name][row], rel=2e-2, name=f"{name} row {row}")


def test_auto_picks_xla_and_pallas_is_refused():
    q = jnp.zeros((1, 4, 1, 8))
    args = (q, q, jnp.zeros((1, 4, 1, 8)), q, jnp.zeros((1, 4, 1)))
    with dispatch.label_calls("test_kda_op.auto"):
        jax.eval_shape(lambda: kda(*args, impl="auto"))
    chosen = {label: c for label, c in dispatch.choices() if c.op == "kda"}["test_kda_op.auto"]
    assert (chosen.requested, chosen.chosen) == ("auto", "xla")
    with pytest.raises(dispatch.ImplUnavailable, match="pallas"):
        kda(*args, impl="pallas")


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
