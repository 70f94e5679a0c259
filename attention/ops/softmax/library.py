"""Library kernels as implementations of `softmax_attention`, for the calls they cover:

- `cudnn`: cuDNN's fused flash attention through `jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA
  GPUs; bf16/fp16; causal, sliding window, GQA);
- `splash`: jax's splash attention (TPU, interpreted on the CPU for tests; causal, sliding window, documents,
  GQA as one multi-query kernel per kv head).

Neither has a per-key additive gate (the SP-KV gate), reads one array as both key and value once, or gives 0 to
a query that sees no key; those calls are refused with the reason (`supports`), and `auto` takes our kernel for
them (auto.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from attention.ops import dispatch
from attention.ops.softmax.api import documents, resolve_scale
from kernels_pallas import platform


def _cudnn_head_dim_limit() -> int:
    # jax's check (cudnn/fused_attention_stablehlo.py): 256 from Hopper (compute capability 9.0) on, else 128.
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    return 256 if float(capability) >= 9.0 else 128


def _dtype_reason(kernel: str, dtype, allowed: tuple[str, str]) -> str | None:
    name = jnp.dtype(dtype).name
    return None if name in allowed else f"{kernel} takes {allowed[0]} or {allowed[1]} inputs, not {name}"


def cudnn_supports(*, backend, dtype, q_shape, k_shape, v_shape, causal, has_key_log_gate, has_segment_ids, **_):
    if backend != "gpu":
        return "cuDNN attention runs on NVIDIA GPUs only"
    if why := _dtype_reason("cuDNN's fused attention", dtype, ("bfloat16", "float16")):
        return why
    if has_key_log_gate:
        return "cuDNN has no per-key additive gate (the SP-KV gate); only a dense [B,H,T,S] bias"
    if has_segment_ids:
        return "jax.nn.dot_product_attention has no packed-document masks"
    if causal and q_shape[1] != k_shape[1]:
        return (f"its causal mask is aligned top-left and this op's bottom-right: they agree only when T == S "
                f"(got T={q_shape[1]}, S={k_shape[1]})")
    D, Dv = q_shape[-1], v_shape[-1]
    if D != Dv:
        return f"different key and value head dims ({D}, {Dv}) need cuDNN 9.10 on Hopper; not enabled"
    limit = _cudnn_head_dim_limit()
    if D % 8 or D > limit:
        return f"cuDNN's fused attention takes head dims that are multiples of 8 up to {limit}; got {D}"
    return None


@dispatch.register("softmax_attention", "cudnn", supports=cudnn_supports)
def softmax_attention_cudnn(q, k, v, *, causal=True, sliding_window=None, local_window=None, key_log_gate=None,
                            segment_ids=None, scale=None):
    return jax.nn.dot_product_attention(
        q, k, v, scale=resolve_scale(scale, q.shape[-1]), is_causal=causal,
        local_window_size=None if sliding_window is None else (sliding_window - 1, 0), implementation="cudnn")


def splash_supports(*, backend, dtype, q_shape, k_shape, causal, has_key_log_gate, **_):
    if backend == "gpu":
        return "splash attention is a TPU kernel"
    if why := _dtype_reason("splash attention", dtype, ("float32", "bfloat16")):
        return why
    if has_key_log_gate:
        return "splash attention has no per-key additive gate (the SP-KV gate)"
    if causal and q_shape[1] > k_shape[1]:
        return ("with T > S the first queries see no key; splash's masks would give them the mean of the values, "
                "this op gives 0")
    return None


# Splash's blocks: 512 rows where the sequence allows, 128 (a lane width) at the least.
SPLASH_BLOCK, SPLASH_MIN_BLOCK = 512, 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dispatch.register("softmax_attention", "splash", supports=splash_supports)
def softmax_attention_splash(q, k, v, *, causal=True, sliding_window=None, local_window=None, key_log_gate=None,
                             segment_ids=None, scale=None, block=None, interpret=None):
    """One multi-query splash kernel per (sequence, kv head) over the group's query heads (vmapped). T and S are
    padded to whole blocks; padded keys get a document id no query has. block overrides SPLASH_BLOCK (tests)."""
    B, T, Hq, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    bq = min(block or SPLASH_BLOCK, _round_up(T, SPLASH_MIN_BLOCK))
    bk = min(block or SPLASH_BLOCK, _round_up(S, SPLASH_MIN_BLOCK))
    Tp, Sp = _round_up(T, bq), _round_up(S, bk)
    shape = (Tp, Sp)
    if sliding_window is not None:
        mask = masks.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=S - T)
    elif causal:
        mask = masks.CausalMask(shape, offset=S - T)
    else:
        mask = masks.FullMask(shape)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                              block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = splash.make_splash_mqa_single_device(masks.MultiHeadMask([mask] * G), block_sizes=sizes,
                                                  interpret=platform.resolve_interpret(interpret))

    ids = jnp.zeros((B, T), jnp.int32) if segment_ids is None else documents(segment_ids)
    # Padded queries repeat the last document (they see real keys; their rows are cut); padded keys are -1.
    q_ids = jnp.pad(ids, ((0, 0), (0, Tp - T)), mode="edge")
    kv_ids = jnp.pad(ids if segment_ids is not None else jnp.zeros((B, S), jnp.int32), ((0, 0), (0, Sp - S)),
                     constant_values=-1)
    segments = None if segment_ids is None and Sp == S else splash.SegmentIds(q=q_ids, kv=kv_ids)

    q_BHGTD = (q * resolve_scale(scale, D)).reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4)
    q_BHGTD = jnp.pad(q_BHGTD, ((0, 0), (0, 0), (0, 0), (0, Tp - T), (0, 0)))
    k_BHSD = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    v_BHSD = k_BHSD if v is k else jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))

    def per_head(q_GTD, k_SD, v_SD, seg):
        return kernel(q_GTD, k_SD, v_SD, segment_ids=seg)

    per_sequence = jax.vmap(per_head, in_axes=(0, 0, 0, None))
    o = jax.vmap(per_sequence, in_axes=(0, 0, 0, None if segments is None else 0))(q_BHGTD, k_BHSD, v_BHSD,
                                                                                    segments)
    return o[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, Dv).astype(q.dtype)
