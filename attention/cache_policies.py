"""Cache policies: which older keys a decode cache keeps within a budget of keys per layer, sequence and KV head.

Every policy runs on the one pruned cache (`attention.pruned_cache`): a ring of the last `window` tokens, which
every query reads, and a store of `budget - window` older keys per (sequence, KV head) pair on average, in pages
of a pool the batch's pairs share. A token leaving the ring enters its pair's store if the policy admits it; when
the pool has no page left for it, the key of lowest score among the pair's store and the newcomer is dropped.
Policies differ only in the admission bit and score they give a token:

    spkv         SP-KV's trained gate: admitted iff its utility u >= tau, scored by u (a full store drops the
                 least useful key). Needs an SP-KV layer; without a budget its store is spkv.cache.capacity.
    sink-window  StreamingLLM (attention sinks + recent window): every key admitted, scored by -position, so the
                 store keeps the first `budget - window` tokens of the sequence and drops every later one.
                 Default window: budget - 4 (the paper's 4 sink tokens).
    h2o          H2O (heavy hitters): every key admitted, scored by the attention it has received since it was
                 cached, summed over the query heads that read its KV head (updated after every read), so a full
                 store drops the key with the least accumulated attention. The decode op returns outputs only, so
                 the attention is computed again by a second, dense pass over the held keys (`attention_mass`):
                 compare h2o's loss and bytes, not its speed.
    random       every key admitted with a uniform random score (by seed, layer and position): the store is a
                 uniform random sample of the older keys.

The default window is the layer's SP-KV window when it has one (so at equal budget the policies differ only in
which older keys they keep), else half the budget (H2O's equal split of heavy hitters and recent tokens).

At a budget every pair's share of the pool is `budget - window` keys rounded up to whole pages (`page`; default
`pruned_cache.page_size`): a pair may hold more than its share while others hold less, so at equal allocated bytes
a policy whose selections differ between heads and sequences (spkv's gate) keeps more of what it admits than a
fixed store per pair would; the baselines admit every key and fill their shares alike.

Use: `layer.init_cache(batch, max_len, dtype, policy=CachePolicy("h2o", budget=256))`; the cache carries its
policy (a static pytree node), and `decode` follows it. `attnlab eval RUN --decode --cache-policy h2o
--cache-budget 256` runs a whole model's softmax layers this way.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attention import pruned_cache
from attention.ops.softmax.api import transform_keys

POLICIES = ("spkv", "sink-window", "h2o", "random")
SINKS = 4  # StreamingLLM's attention sinks


class CachePolicyError(ValueError):
    """A policy that cannot run on a layer or with a budget; the message says what to change."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """A cache policy (see the module docstring) at `budget` keys per layer, sequence and KV head (the window
    included; None: spkv only, its configured store beside the window). `window`: recent keys always held (None:
    the policy's default). `seed`: the random policy's draws. `page`: slots per page of the store's pool (None:
    `pruned_cache.page_size` of the store)."""

    name: str
    budget: int | None = None
    window: int | None = None
    seed: int = 0
    page: int | None = None

    def __post_init__(self):
        if self.name not in POLICIES:
            raise CachePolicyError(f"unknown cache policy {self.name!r}; use one of {', '.join(POLICIES)}")
        if self.budget is None and self.name != "spkv":
            raise CachePolicyError(f"cache policy {self.name} needs a budget (keys per layer and KV head)")
        if self.budget is not None and self.budget < 1:
            raise CachePolicyError(f"a cache budget is a number of keys per layer and KV head, at least 1; "
                                   f"got {self.budget}")
        if self.window is not None and self.window < 1:
            raise CachePolicyError(f"a cache window is the recent keys always held, at least 1; got {self.window}")
        if self.page is not None and self.page < 1:
            raise CachePolicyError(f"a cache page holds at least 1 key; got {self.page}")

    def slots(self, max_len: int, spkv=None) -> tuple[int, int]:
        """(ring, store) slots of a layer's cache for sequences of up to `max_len` tokens; `spkv` is the layer's
        SPKVConfig (None: no SP-KV gate). Raises CachePolicyError for a budget the window does not fit in."""
        if self.name == "spkv" and spkv is None:
            raise CachePolicyError("cache policy spkv needs SP-KV layers (model.mixers.<name>.spkv); this layer "
                                   "has no utility gate, so use sink-window, h2o or random")
        window = self._window(spkv)
        if self.budget is None:
            return (pruned_cache.ring_slots(window, max_len),
                    pruned_cache.store_slots(spkv.cache.capacity, window, max_len))
        if window > self.budget:
            raise CachePolicyError(f"cache budget {self.budget} is smaller than the window of {window} recent keys it "
                                   f"must hold; raise the budget or lower the window")
        return (pruned_cache.ring_slots(window, max_len),
                pruned_cache.store_slots(self.budget - window, window, max_len))

    def _window(self, spkv) -> int:
        if self.window is not None:
            return self.window
        if self.name == "sink-window":
            if self.budget <= SINKS:
                raise CachePolicyError(f"cache policy sink-window keeps {SINKS} sink tokens and a recent window: "
                                       f"give a budget above {SINKS} (got {self.budget})")
            return self.budget - SINKS
        return spkv.window if spkv is not None else max(self.budget // 2, 1)

    def token(self, *, position, batch: int, n_kv_heads: int, layer_idx: int, utility=None,
              threshold: float | None = None) -> tuple[jax.Array, jax.Array]:
        """(score, admit) [B,Hkv] of the token at `position`; `utility` [B,Hkv] is the SP-KV gate's logit and
        `threshold` the logit of tau (spkv only)."""
        shape = (batch, n_kv_heads)
        yes = jnp.ones(shape, bool)
        if self.name == "spkv":
            return utility, utility >= threshold
        if self.name == "sink-window":
            return jnp.full(shape, -position, jnp.float32), yes
        if self.name == "h2o":
            return jnp.zeros(shape, jnp.float32), yes
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.seed), layer_idx), position)
        return jax.random.uniform(key, shape), yes

    def observe(self, cache: dict, q, position, *, scale: float, **key_transform) -> dict:
        """The cache after the step's read by query q [B,1,Hq,D] at `position`: H2O adds each held key's attention,
        summed over the query heads of its KV head, to its score; other policies leave it as it is.
        key_transform: how the scores' keys follow from the cached ones (`transform_keys`, without positions:
        each slot's own are used)."""
        if self.name != "h2o":
            return cache
        keys, pos, held = pruned_cache.dense_view(cache, position)
        if key_transform.get("key_rope_theta") is not None:
            key_transform = {**key_transform, "key_positions": pos}
        return pruned_cache.add_scores(cache, attention_mass(q, keys, held, scale=scale, **key_transform))


def attention_mass(q, keys, held_BSH, *, scale: float, **key_transform) -> jax.Array:
    """[B,S,Hkv] fp32: the softmax weight query q [B,1,Hq,D] gives each held slot of `keys` [B,S,Hkv,D] (where
    `held_BSH`; the keys derived by `transform_keys`), summed over the query heads that read each KV head."""
    B, _, Hq, D = q.shape
    Hkv = keys.shape[2]
    k = transform_keys(jnp.where(held_BSH[..., None], keys, 0), **key_transform)
    q_BHGD = q[:, 0].reshape(B, Hkv, Hq // Hkv, D).astype(jnp.float32)
    s_BSHG = jnp.einsum("bhgd,bshd->bshg", q_BHGD, k, precision=jax.lax.Precision.HIGHEST) * scale
    s_BSHG = jnp.where(held_BSH[..., None], s_BSHG, -jnp.inf)
    m = jnp.max(s_BSHG, axis=1, keepdims=True)
    p = jnp.exp(s_BSHG - jnp.where(jnp.isfinite(m), m, 0.0))
    p = p / jnp.maximum(jnp.sum(p, axis=1, keepdims=True), 1e-30)
    return jnp.sum(p, axis=-1)


def init(policy: CachePolicy, batch: int, n_kv_heads: int, dims: dict[str, int], dtype, max_len: int,
         spkv=None) -> dict:
    """An empty pruned cache under `policy` for one layer (`spkv`: its SPKVConfig, None without a gate), holding
    per slot and KV head one vector per entry of `dims` (name -> width); the cache carries its policy."""
    ring, store = policy.slots(max_len, spkv)
    return {**pruned_cache.init(batch, n_kv_heads, dims, dtype, ring=ring, capacity=store, older=max_len - ring,
                                page=policy.page or pruned_cache.page_size(store)), "policy": policy}


def append(cache: dict, entries: dict[str, jax.Array], position, *, layer_idx: int, utility=None,
           threshold: float | None = None) -> dict:
    """`pruned_cache.append` with the score and admission bit the cache's policy gives the token at `position`
    (`utility`, `threshold`: the layer's SP-KV gate logits [B,Hkv] and the logit of tau, when it has a gate)."""
    B, _, H = cache["admit"].shape
    score, admit = cache["policy"].token(position=position, batch=B, n_kv_heads=H, layer_idx=layer_idx,
                                         utility=utility, threshold=threshold)
    return pruned_cache.append(cache, entries, position, score=score, admit=admit)
