"""The decays of one lightning chunk (the plan and the dot are `kernels_pallas.chunked`'s).

Positions are absolute (token t of the padded row); document indices `doc` count the document starts at or
before each token (0 for the first document, which the initial state belongs to), and `prev` is the document
of the token before (0 before token 0). Every exponent is lambda times a non-negative distance inside one
chunk, so nothing overflows however strong the decay.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from kernels_pallas.chunked import Plan


@dataclasses.dataclass
class Decays:
    """Decays of chunk n, all fp32: intra [C, C] (query row i, key column j, 0 off the causal same-document
    triangle), query [C, 1] (the incoming state to query i), key [C, 1] (key j to the chunk's last real token,
    for the outgoing state) and carry [1, 1] (the incoming state through the whole chunk)."""

    intra: jnp.ndarray
    query: jnp.ndarray
    key: jnp.ndarray
    carry: jnp.ndarray


def decays(plan: Plan, lam, n, doc=None, prev=None) -> Decays:
    """lam [1, 1] fp32 (<= 0); doc, prev [C, 1] int32 document indices of the chunk's tokens and of the token
    before each (None without segments)."""
    C = plan.chunk
    i = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    j = lax.broadcasted_iota(jnp.int32, (1, C), 1)
    length = jnp.minimum(C, plan.t - n * C)             # real tokens in this chunk
    real = i < length
    causal = i >= j
    query_ok = jnp.ones((C, 1), bool)
    key_ok = real
    carry_ok = jnp.ones((1, 1), bool)
    if doc is not None:
        causal &= doc == doc.reshape(1, C)
        before = jnp.max(jnp.where(i == 0, prev, -1), axis=0, keepdims=True)       # document before the chunk
        last = jnp.max(jnp.where(real, doc, -1), axis=0, keepdims=True)            # of its last real token
        query_ok = doc == before
        key_ok &= doc == last
        carry_ok = last == before
    fi = i.astype(jnp.float32)
    intra = jnp.exp(jnp.where(causal, lam * (fi - j.astype(jnp.float32)), -jnp.inf))
    query = jnp.where(query_ok, jnp.exp(lam * (fi + 1.0)), 0.0)
    key = jnp.where(key_ok, jnp.exp(lam * (length - 1 - i).astype(jnp.float32)), 0.0)
    carry = jnp.where(carry_ok, jnp.exp(lam * length.astype(jnp.float32)), 0.0)
    return Decays(intra, query, key, carry)
