"""lm.generate beyond the decode path: sampling settings, the context limit per positional scheme, and
generation with a sliding window."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import load_config
from lm.generate import (GenerationError, generate_ids, generate_sliding, plan_length, sampling_settings,
                         slide_keep)
from lm.model import init_model, pop_sown
from lm.train import RunError

TINY = "configs/tiny/softmax.yaml"
# A large init scale makes an untrained model's next token depend on its context, so a wrong window shows.
SMALL = ["model.d_model=32", "model.n_layers=2", "model.mlp.hidden=64", "model.mixers.softmax.n_heads=2",
         "data.seq_len=16", "model.init_std=0.5"]
LEARNED = ["model.norm=layernorm", "model.bias=true", "model.pos=learned", "model.mlp.kind=gelu",
           "model.tie_embeddings=true", "model.max_seq_len=16"]


def _cfg(extra=()):
    return load_config(TINY, SMALL + list(extra))


# --- sampling settings -----------------------------------------------------------------------------------------

def test_sampling_defaults_and_greedy():
    assert sampling_settings() == {"temperature": 0.8, "top_k": 40, "top_p": None}
    assert sampling_settings(greedy=True) == {"temperature": 0.0, "top_k": None, "top_p": None}
    assert sampling_settings(temperature=1.2, top_k=5, top_p=0.9) == {"temperature": 1.2, "top_k": 5, "top_p": 0.9}
    assert sampling_settings(top_p=1.0)["top_p"] == 1.0


@pytest.mark.parametrize("kw, match", [
    ({"top_k": 0}, r"--top-k must be at least 1 \(got 0\)"),
    ({"top_k": -3}, r"--top-k must be at least 1 \(got -3\)"),
    ({"temperature": 0.0}, r"--temperature must be greater than 0 \(got 0.0\).*--greedy"),
    ({"temperature": -1.0}, r"--temperature must be greater than 0"),
    ({"temperature": float("nan")}, r"--temperature must be greater than 0"),
    ({"temperature": float("inf")}, r"--temperature must be .*finite"),
    ({"top_p": 0.0}, r"--top-p must be in \(0, 1\] \(got 0.0\)"),
    ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
    ({"top_p": -0.2}, r"--top-p must be in \(0, 1\]"),
    ({"greedy": True, "temperature": 0.8}, r"--greedy .* --temperature"),
    ({"greedy": True, "top_k": 5}, r"--greedy .* --top-k"),
])
def test_bad_sampling_settings_are_refused(kw, match):
    with pytest.raises(GenerationError, match=match) as e:
        sampling_settings(**kw)
    assert isinstance(e.value, RunError)  # the CLI reports RunErrors as one-line errors with exit status 2
    assert "\n" not in str(e.value)


# --- the context limit ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["model.pos=none"], LEARNED], ids=["rope", "nope", "learned"])
def test_within_the_trained_context_is_one_pass(extra):
    plan = plan_length(_cfg(extra), n_prompt=4, max_new_tokens=12)
    assert plan.window is None and plan.note is None


@pytest.mark.parametrize("extra, scheme", [([], "RoPE"), (["model.pos=none"], "no positional encoding"),
                                           (LEARNED, "learned positions")], ids=["rope", "nope", "learned"])
def test_past_the_trained_context_is_refused_by_default(extra, scheme):
    with pytest.raises(GenerationError) as e:
        plan_length(_cfg(extra), n_prompt=4, max_new_tokens=20)
    msg = str(e.value)
    assert "\n" not in msg
    # The numbers, the limit's source, and each way out.
    for part in ("4 tokens", "--max-new-tokens 20", "24 tokens", "data.seq_len=16", "at most 12", "--slide",
                 scheme):
        assert part in msg, (part, msg)


def test_a_prompt_that_fills_the_context_alone():
    with pytest.raises(GenerationError, match=r"shorten the prompt to under 16 tokens"):
        plan_length(_cfg(), n_prompt=16, max_new_tokens=1)


def test_extrapolation_per_scheme():
    """RoPE/NoPE may run past data.seq_len on request (said on stderr); learned positions never past the table."""
    plan = plan_length(_cfg(), n_prompt=4, max_new_tokens=40, extrapolate=True)
    assert plan.window is None and "extrapolat" in plan.note and "data.seq_len=16" in plan.note
    assert plan_length(_cfg(["model.pos=none"]), n_prompt=4, max_new_tokens=40, extrapolate=True).window is None
    with pytest.raises(GenerationError, match=r"model.max_seq_len=16.*--slide"):
        plan_length(_cfg(LEARNED), n_prompt=4, max_new_tokens=40, extrapolate=True)
    # A learned table longer than the training windows: positions up to the table's end, said to be untrained.
    longer = _cfg(LEARNED[:-1] + ["model.max_seq_len=64"])
    plan = plan_length(longer, n_prompt=4, max_new_tokens=40, extrapolate=True)
    assert plan.window is None and "never trained" in plan.note
    with pytest.raises(GenerationError, match=r"model.max_seq_len=64"):
        plan_length(longer, n_prompt=4, max_new_tokens=80, extrapolate=True)
    with pytest.raises(GenerationError, match=r"--slide or --extrapolate"):
        plan_length(_cfg(), n_prompt=4, max_new_tokens=40, slide=True, extrapolate=True)


def test_generate_ids_refuses_positions_past_a_learned_table():
    mdef, params = init_model(_cfg(LEARNED))
    prompt = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    assert generate_ids(mdef, params, prompt, jax.random.PRNGKey(0), max_new_tokens=13).shape == (1, 17)
    with pytest.raises(GenerationError, match=r"model.max_seq_len=16"):
        generate_ids(mdef, params, prompt, jax.random.PRNGKey(0), max_new_tokens=14)


def test_slide_plan():
    plan = plan_length(_cfg(LEARNED), n_prompt=4, max_new_tokens=40, slide=True)
    assert plan.window == 16 and "16-token window" in plan.note and "last 8 tokens" in plan.note
    plan = plan_length(_cfg(), n_prompt=20, max_new_tokens=4, slide=True)
    assert "the prompt's first 12 tokens" in plan.note


# --- sliding-window generation ------------------------------------------------------------------------------------

def _greedy_reference(mdef, params, prompt, n_new, window):
    """Greedy tokens, each from the full forward over the context the sliding window leaves it: the whole
    sequence while it fits, then the last `keep` tokens before each refill. (The context is right-padded to
    `window` tokens for one compilation: the model is causal, so the padding does not change the logits read.)"""
    forward = jax.jit(lambda p, t: mdef.merge(p)(t))
    keep = slide_keep(window)
    out = list(prompt)
    start = 0 if len(prompt) < window else len(prompt) - keep
    while len(out) < len(prompt) + n_new:
        if len(out) - start == window:
            start = len(out) - keep
        ctx = out[start:]
        assert len(ctx) < window
        logits = forward(params, jnp.asarray([ctx + [0] * (window - len(ctx))], jnp.int32))
        out.append(int(jnp.argmax(logits[0, len(ctx) - 1])))
    return out


@pytest.mark.parametrize("extra, prompt_len", [([], 5), (LEARNED, 5), (LEARNED, 21)],
                         ids=["rope", "learned", "learned_long_prompt"])
def test_sliding_generation_stays_in_the_window(extra, prompt_len):
    cfg = _cfg(extra)
    mdef, params = init_model(cfg)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, prompt_len)), jnp.int32)
    out = generate_sliding(mdef, params, prompt, jax.random.PRNGKey(0), max_new_tokens=30, window=16,
                           temperature=0.0, top_k=None, top_p=None)
    assert out.shape == (1, prompt_len + 30)
    assert out[0, :prompt_len].tolist() == prompt[0].tolist()
    assert out[0].tolist() == _greedy_reference(mdef, params, prompt[0].tolist(), 30, 16)


def test_sliding_generation_samples_reproducibly():
    mdef, params = init_model(_cfg())
    prompt = jnp.asarray([[1, 2, 3]], jnp.int32)
    kw = dict(max_new_tokens=40, window=16, temperature=1.0, top_k=None, top_p=None)
    a = generate_sliding(mdef, params, prompt, jax.random.PRNGKey(3), **kw)
    b = generate_sliding(mdef, params, prompt, jax.random.PRNGKey(3), **kw)
    assert a.tolist() == b.tolist()
    # Within the window it is the one-pass generation.
    short = generate_sliding(mdef, params, prompt, jax.random.PRNGKey(3), **{**kw, "max_new_tokens": 13})
    one = generate_ids(mdef, params, prompt, jax.random.PRNGKey(3), max_new_tokens=13, temperature=1.0)
    assert short.tolist() == one.tolist()


# --- SP-KV: the pruned cache ---------------------------------------------------------------------------------------

SPKV = ["model.mixers.softmax.spkv.window=4", "model.mixers.softmax.spkv.init_bias=0.0",
        "model.mixers.softmax.spkv.anneal=null"]


def test_spkv_greedy_generation_is_the_hard_mask_forward():
    """Greedy tokens generated through the pruned cache (a ring of 4 and a store per KV head) equal those of the
    full forward, whose gate outside a train step is the hard 0/-inf mask; and some gate is closed, so the cache
    really prunes."""
    cfg = load_config("configs/tiny/spkv.yaml", SMALL + SPKV)
    mdef, params = init_model(cfg)
    prompt = np.random.default_rng(0).integers(0, 256, 5).tolist()
    out = generate_ids(mdef, params, jnp.asarray([prompt], jnp.int32), jax.random.PRNGKey(0), max_new_tokens=11)
    assert out[0].tolist() == _greedy_reference(mdef, params, prompt, 11, 17)
    model = mdef.merge(params)
    model(out)
    _, stats = pop_sown(model)
    kept = sum(int(np.sum(s["spkv_kept"])) for s in stats.values())
    older = sum(int(s["spkv_older"]) * len(s["spkv_kept"]) for s in stats.values())
    assert 0 < kept < older, (kept, older)
