"""lomo_jax.models.generate: KV-cache decoding against transformers' generate
(greedy, left-padded batches, every model family), against recomputing
llama_logits on the whole sequence, sampling (reproducibility, top_k=1, the
first token's distribution under temperature / top_k / top_p) and errors.
All models are tiny and built offline."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lomo_jax.models import convert, generate, llama  # noqa: E402
from lomo_jax.models.decoding import (  # noqa: E402
    filter_logits,
    forward_cached,
    init_cache,
    prompt_positions,
)
from tests.jax.tiny_llama import hf_model  # noqa: E402

N_NEW = 6
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def _prompts(seed=0, b=2, t=7, pads=(3, 0)):
    """Left-padded prompts ``[b, t]`` (row ``i`` has ``pads[i]`` pads, id 0) and mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i, p in enumerate(pads):
        ids[i, :p], mask[i, :p] = 0, 0
    return ids, mask


def _hf_greedy(hf, ids, mask, n):
    hf.generation_config.eos_token_id = None  # run all n steps (our generate has no EOS)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


def _jgen(cfg, params, ids, mask, **kw):
    kw.setdefault("max_new_tokens", N_NEW)
    m = None if mask is None else jnp.asarray(np.asarray(mask))
    return np.asarray(generate(cfg, params, jnp.asarray(np.asarray(ids)), attention_mask=m, **kw))


@pytest.fixture(scope="module")
def mistral():
    """Mistral with a window of 4 (< prompt 7 + 6 new), GQA: ``(hf, cfg, params)``."""
    hf = hf_model("mistral", seed=3, sliding_window=4)
    cfg, params = convert.from_hf_model(hf)
    assert cfg.sliding_window == 4 and cfg.num_kv_groups == 2
    return hf, cfg, params


@pytest.mark.parametrize("kind,kw", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "rope_parameters": LLAMA3}),
    ("qwen2", {}),
])
def test_greedy_matches_transformers(kind, kw):
    hf = hf_model(kind, seed=0, **kw)
    cfg, params = convert.from_hf_model(hf)
    assert cfg.tie_word_embeddings == bool(kw) and cfg.has_qkv_bias == (kind == "qwen2")
    ids, mask = _prompts(seed=1)
    ref = _hf_greedy(hf, ids, mask, N_NEW)
    out = _jgen(cfg, params, ids, mask)
    assert out.shape == (2, N_NEW) and out.dtype == np.int32
    np.testing.assert_array_equal(out, ref)


def test_greedy_matches_transformers_mistral_sliding_window(mistral):
    hf, cfg, params = mistral
    ids, mask = _prompts(seed=1)
    ref = _hf_greedy(hf, ids, mask, N_NEW)
    np.testing.assert_array_equal(_jgen(cfg, params, ids, mask), ref)
    # the window matters here: without it the tokens differ
    full = _jgen(cfg.replace(sliding_window=None), params, ids, mask)
    assert (full != ref).any()
    # a batch without padding, attention_mask=None
    ids0, _ = _prompts(seed=2, pads=(0, 0))
    np.testing.assert_array_equal(_jgen(cfg, params, ids0, None),
                                  _hf_greedy(hf, ids0, torch.ones_like(ids0), N_NEW))


def test_prompt_positions_as_transformers():
    """cumsum(mask) - 1, pads at 0 (a uniform shift of a row's positions leaves
    RoPE attention unchanged up to rounding, so generate's tokens cannot see it)."""
    _, mask = _prompts(pads=(3, 0))
    mask[1, :1] = 0
    ref = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0).numpy()
    np.testing.assert_array_equal(prompt_positions(jnp.asarray(mask.numpy())), ref)
    np.testing.assert_array_equal(ref[0], [0, 0, 0, 0, 1, 2, 3])


def _full_batch(ids, mask, new, length=None):
    """``llama_logits`` inputs for prompt + ``new`` (positions as transformers'
    generate), right-padded to ``length`` (causal: the pads do not change the
    logits before them, and one compiled shape serves every step)."""
    seq = np.concatenate([np.asarray(ids), new], axis=1)
    m = np.concatenate([np.asarray(mask), np.ones_like(new)], axis=1)
    pos = np.where(m != 0, np.cumsum(m, axis=1) - 1, 0)
    extra = [(0, 0), (0, (length or seq.shape[1]) - seq.shape[1])]
    seq, m, pos = (np.pad(x, extra) for x in (seq, m, pos))
    return {"input_ids": jnp.asarray(seq, jnp.int32), "attention_mask": jnp.asarray(m, jnp.int32),
            "position_ids": jnp.asarray(pos, jnp.int32)}


_logits = jax.jit(llama.llama_logits, static_argnums=0)


def test_greedy_equals_naive_recompute_loop(mistral):
    """Greedy decoding by recomputing llama_logits on the growing sequence."""
    _, cfg, params = mistral
    ids, mask = _prompts(seed=4, pads=(2, 5))
    t = ids.shape[1]
    new = np.zeros((2, 0), np.int64)
    for i in range(N_NEW):
        logits = _logits(cfg, params, _full_batch(ids, mask, new, t + N_NEW))
        nxt = np.asarray(jnp.argmax(logits[:, t + i - 1], -1))
        new = np.concatenate([new, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(_jgen(cfg, params, ids, mask), new)


def test_cache_logits_equal_full_sequence_logits(mistral):
    """Teacher-forced: prefill and every decode step give the logits of the last
    token of the whole sequence so far."""
    _, cfg, params = mistral
    ids, mask = _prompts(seed=5, pads=(4, 1))
    t = ids.shape[1]
    new = np.random.default_rng(0).integers(0, 128, (2, N_NEW))
    full = np.asarray(_logits(cfg, params, _full_batch(ids, mask, new)))
    m = np.asarray(mask)
    pos = np.where(m != 0, np.cumsum(m, 1) - 1, 0)
    valid = jnp.asarray(np.concatenate([m, np.ones_like(new)], 1), jnp.int32)
    fwd = jax.jit(functools.partial(forward_cached, cfg))
    cache = init_cache(cfg, 2, t + N_NEW)
    logits, cache = fwd(params, cache, jnp.asarray(np.asarray(ids)), jnp.asarray(pos), valid, 0)
    np.testing.assert_allclose(logits, full[:, t - 1], rtol=1e-5, atol=1e-5)
    for i in range(1, N_NEW):
        step_pos = jnp.asarray(pos[:, -1:] + i)
        logits, cache = fwd(params, cache, jnp.asarray(new[:, i - 1:i]), step_pos, valid, t + i - 1)
        np.testing.assert_allclose(logits, full[:, t + i - 1], rtol=1e-5, atol=1e-5, err_msg=i)
    assert np.abs(full).max() > 1.0


def test_sampling_reproducible_and_top_k_1_is_greedy(mistral):
    _, cfg, params = mistral
    ids, mask = _prompts(seed=6)
    key = jax.random.key(0)
    sample = functools.partial(_jgen, cfg, params, ids, mask, temperature=1.0, top_k=100)
    a = sample(rng=key)
    np.testing.assert_array_equal(a, sample(rng=key))
    assert (a != sample(rng=jax.random.key(1))).any()
    greedy = _jgen(cfg, params, ids, mask, rng=key)  # rng is ignored when greedy
    assert (a != greedy).any()
    for k in range(3):  # (same program: temperature and top_k are traced)
        np.testing.assert_array_equal(
            _jgen(cfg, params, ids, mask, temperature=0.7, top_k=1, rng=jax.random.key(k)),
            greedy)
    # every step draws with its own key: near-uniform sampling does not repeat one
    # token 6 times in a row (chance 127**-5 per row with independent keys; with
    # one key reused, the same Gumbel noise would pick the same token each step)
    hot = sample(temperature=1e3, top_k=127, rng=key)
    assert all(len(set(row)) > 1 for row in hot.tolist())


def _hf_filter(logits, temperature, top_k, top_p):
    """transformers' warpers (temperature, top-k, top-p, in generate's order)."""
    x = torch.from_numpy(np.array(logits, np.float32))
    x = transformers.TemperatureLogitsWarper(temperature)(None, x)
    if top_k is not None:
        x = transformers.TopKLogitsWarper(top_k)(None, x)
    if top_p is not None:
        x = transformers.TopPLogitsWarper(top_p)(None, x)
    return x.numpy()


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.5), (20, 0.7), (None, 1.0)])
def test_filter_logits_keeps_transformers_support(top_k, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(1), (64, 128))) * 2.0
    ours = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    ref = _hf_filter(logits, 1.0, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], logits[np.isfinite(ours)])
    assert np.isfinite(ours).sum(1).min() >= 1


def _bernstein_eps(p, n, delta):
    r"""Half-width ``eps`` with ``P(|p_hat - p| >= eps) <= delta`` for a frequency
    of ``n`` Bernoulli(``p``) draws (Bernstein: ``2 exp(-n eps^2 / (2 p(1-p) +
    2 eps / 3))``), solved for ``eps``."""
    lg = math.log(2.0 / delta)
    return (2 * lg / 3 + np.sqrt((2 * lg / 3) ** 2 + 8 * n * lg * p * (1 - p))) / (2 * n)


@pytest.mark.parametrize("temperature,top_k,top_p,raw_keys", [(0.7, None, None, False),
                                                              (1.3, 30, 0.7, True)])
def test_first_token_distribution(mistral, temperature, top_k, top_p, raw_keys):
    """Frequencies of the first sampled token over n keys vs softmax(filtered
    logits / T): every cell within its Bernstein bound (failure probability
    1e-6 in all, union bound over the cells), and no filtered token drawn."""
    _, cfg, params = mistral
    ids, mask = _prompts(seed=7)
    n = 20000
    toks = _vmap_draw(cfg, params, ids, mask, n, temperature, top_k, top_p, raw_keys)
    assert toks.shape == (n, 2)
    t = ids.shape[1]
    logits = np.asarray(_logits(cfg, params, _full_batch(ids, mask, np.zeros((2, 0)), t + N_NEW)))
    logits = logits[:, t - 1]
    ref = _hf_filter(logits, temperature, top_k, top_p)
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    freq = np.stack([np.bincount(toks[:, b], minlength=cfg.vocab_size) for b in range(2)]) / n
    assert (freq[p == 0] == 0).all()  # nothing outside top_k / top_p
    eps = _bernstein_eps(p, n, 1e-6 / p.size)
    assert (np.abs(freq - p) <= eps).all(), np.abs(freq - p).max()
    assert (p > 0).sum(1).min() > 2  # the distribution is not trivial


def _vmap_draw(cfg, params, ids, mask, n, temperature, top_k, top_p, raw_keys):
    """First new token of each row for ``n`` keys: ``[n, B]`` (``generate`` vmapped;
    ``raw_keys``: old-style ``uint32[2]`` keys)."""
    i, m = jnp.asarray(np.asarray(ids)), jnp.asarray(np.asarray(mask))

    def one(key):
        return generate(cfg, params, i, attention_mask=m, max_new_tokens=1,
                        temperature=temperature, top_k=top_k, top_p=top_p, rng=key)[:, 0]

    keys = jax.random.split(jax.random.PRNGKey(42) if raw_keys else jax.random.key(42), n)
    return np.asarray(jax.vmap(one)(keys))


def test_bad_inputs_raise(mistral):
    _, cfg, params = mistral
    ids, mask = (jnp.asarray(np.asarray(x)) for x in _prompts())
    gen = functools.partial(generate, cfg, params, max_new_tokens=2)
    cases = [
        (dict(input_ids=ids[0]), r"input_ids must be a \[B, T\] integer array.*\(7,\)"),
        (dict(input_ids=ids.astype(jnp.float32)), r"input_ids must be.*float32"),
        (dict(input_ids=ids.at[0, 5].set(128)), r"input_ids must lie in \[0, vocab_size=128\)"),
        (dict(input_ids=ids, attention_mask=mask[:, 1:]), r"attention_mask must.*shape.*\(2, 6\)"),
        (dict(input_ids=ids, attention_mask=mask.astype(jnp.float32)),
         r"attention_mask must be an integer or bool.*float32"),
        (dict(input_ids=ids, attention_mask=mask * 2), r"only 0 \(padding\) and 1"),
        (dict(input_ids=ids, attention_mask=mask[:, ::-1]), r"rows \[0\] end in padding.*left"),
        (dict(input_ids=ids, attention_mask=mask.at[1, 3].set(0)), r"padding after a token"),
        (dict(input_ids=ids, max_new_tokens=0), r"max_new_tokens must be an integer >= 1; got 0"),
        (dict(input_ids=ids, max_new_tokens=58), r"7 \+ max_new_tokens 58 = 65 exceeds "
                                                 r"cfg\.max_position_embeddings=64"),
        (dict(input_ids=ids, temperature=1.0), r"needs rng"),
        (dict(input_ids=ids, temperature=1.0, rng=3), r"rng must be a jax.random key; got int"),
        (dict(input_ids=ids, temperature=1.0, rng=jax.random.split(jax.random.key(0))),
         r"rng must be a single jax.random key"),
        (dict(input_ids=ids, temperature=-1.0), r"temperature must be a finite number >= 0"),
        (dict(input_ids=ids, temperature=1.0, top_p=0.0, rng=jax.random.key(0)),
         r"top_p must be None or in \(0, 1\]; got 0.0"),
        (dict(input_ids=ids, temperature=1.0, top_p=1.5, rng=jax.random.key(0)), r"top_p"),
        (dict(input_ids=ids, temperature=1.0, top_k=0, rng=jax.random.key(0)),
         r"top_k must be None or an integer >= 1; got 0"),
    ]
    for kw, match in cases:
        kw = {"attention_mask": mask, **kw}
        with pytest.raises(ValueError, match=match):
            gen(**kw)
    bad = {**params, "head": {**params["head"], "norm": params["head"]["norm"][:3]}}
    with pytest.raises(ValueError, match=r"norm.*\(3,\).*\(64,\)"):
        generate(cfg, bad, ids, attention_mask=mask, max_new_tokens=2)


def test_family_agnostic_entry_points():
    """``models.logits`` / ``models.layered_model`` are the family's functions;
    a config of no supported family is refused by name."""
    from lomo_jax import LayeredModel, models
    from lomo_jax.models import llama

    cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2)
    params = llama.init_params(cfg, 0)
    batch = {"input_ids": jnp.arange(10, dtype=jnp.int32).reshape(2, 5)}
    np.testing.assert_array_equal(models.logits(cfg, params, batch),
                                  llama.llama_logits(cfg, params, batch))
    lm = models.layered_model(cfg)
    assert isinstance(lm, LayeredModel)
    np.testing.assert_array_equal(lm.embed(params["embed"], batch),
                                  llama.llama_embed(cfg, params["embed"], batch))
    for fn in (lambda c: models.logits(c, params, batch), models.layered_model):
        with pytest.raises(TypeError, match="LlamaConfig.*got dict"):
            fn({"model_type": "gemma"})


@pytest.mark.parametrize("window, layer_types, sliding", [
    (None, None, None), (3, None, None),
    (3, ("sliding_attention", "full_attention"), True),
    (3, ("sliding_attention", "full_attention"), False)])
def test_attention_mask_rows_are_the_full_masks_rows(window, layer_types, sliding):
    """A decoding step builds only its own queries' rows of the mask (at a traced
    start): the rows of the full ``[T, T]`` mask, with padding, the window and a
    mixed config's per-layer flag."""
    cfg = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                            num_hidden_layers=2, num_attention_heads=2,
                            sliding_window=window, layer_types=layer_types)
    pad = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 8 + [0, 0]])
    full = llama.attention_mask(cfg, 10, pad, sliding)
    rows = jax.jit(lambda s, c: llama.attention_mask(cfg, 10, pad, sliding, query_start=s,
                                                     num_queries=c), static_argnums=1)
    for start, count in ((0, 10), (4, 3), (9, 1)):
        np.testing.assert_array_equal(rows(start, count), full[:, start:start + count])
    assert not np.array_equal(rows(4, 3), full[:, 3:6])  # the rows are where they claim
