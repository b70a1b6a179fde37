"""sparseforge as a transformers attention implementation (``sparseforge.integrations.transformers``),
and the capability it needs underneath: a key padding mask with keys on a grid of their own
(decode over a left-padded cache) on the CPU executor.

Model tests use tiny random configs (1-2 layers, hidden 32-64, vocab 100; no downloads) and
compare with the same model on transformers' own eager attention in float32:

- logits at the real positions and the loss gradients of every parameter (the sinks' too) agree
  within ``tolerance(float32, terms)`` of ``runtime.check`` (a per-row error; ``terms`` is the
  longest reduction of the model, hidden + intermediate + sequence per layer), which fails an
  all-zero gradient (row error 1);
- greedy ``generate()`` on a left-padded batch gives the same tokens (causal LMs), with the
  sliding layers' caches dropping keys (kv_offset > 0) within the generated length.
"""
from __future__ import annotations

import copy

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime.check import row_errors, tolerance

H, KVH, D = 4, 2, 8
VOCAB = 100


# ------------------------------------------------------------------------------------
# key padding mask with keys on a grid of their own (CPU executor + reference)
# ------------------------------------------------------------------------------------
SHARDS = sf.StridedShards(block_size=2, local_blocks=1, vertical_stride=2) & sf.Causal()


def _qkv(b, nq, nk, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, H, nq, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(b, KVH, nk, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(b, KVH, nk, D, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def _left_padding(b, n, pads):
    kp = torch.ones(b, n, dtype=torch.bool)
    for i, p in enumerate(pads):
        kp[i, :p] = False
    return kp


@pytest.mark.parametrize("pattern", [sf.Causal(), sf.SlidingWindow(3), SHARDS], ids=["causal", "window", "shards"])
@pytest.mark.parametrize("nq", [1, 4])
@pytest.mark.parametrize("sinks", [False, True])
def test_decode_key_padding_is_the_bottom_rows_of_self_attention(pattern, nq, sinks):
    """Decode / chunked prefill over a left-padded cache (Nq < Nk, key_padding_mask [B, Nk]):
    the CPU executor and the reference equal the last Nq rows of self attention on the Nk
    tokens with the same key padding mask (already tested against brute force), LSE and the
    gradients of q, k, v and the sink logits included."""
    nk, b = 11, 3
    kp = _left_padding(b, nk, [0, 3, nk - 2])  # sample 2: only its last 2 tokens are real
    if nq > 1:
        kp[2, :] = False
        kp[2, -1] = True  # chunked prefill: query rows 0..2 of sample 2 are padding
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(H, generator=g, dtype=torch.float64).requires_grad_()
    mods = (sf.Softcap(3.0), sf.Sinks(logits)) if sinks else ()
    problem = sf.Problem(grid=nk, heads=H, kv_heads=KVH, head_dim=D, dtype=torch.float64)
    attn = sf.compile(pattern, problem, modifiers=mods)
    q, k, v = _qkv(b, nq, nk)
    qf = torch.zeros(b, H, nk, D, dtype=torch.float64)
    qf[:, :, nk - nq:] = q.detach()
    qf.requires_grad_()
    want, want_lse = sf.reference_attention(qf, k, v, pattern, problem, modifiers=mods, key_padding_mask=kp,
                                            return_lse=True)
    want, want_lse = want[:, :, nk - nq:], want_lse[:, :, nk - nq:]
    got, lse = attn(q, k, v, modifiers=mods, key_padding_mask=kp, return_lse=True)
    cross = sf.Problem(grid=nq, kv_grid=nk, heads=H, kv_heads=KVH, head_dim=D, dtype=torch.float64)
    ref, ref_lse = sf.reference_attention(q, k, v, pattern, cross, modifiers=mods, key_padding_mask=kp,
                                          return_lse=True)
    for out, l in ((got, lse), (ref, ref_lse)):
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
        assert torch.equal(torch.isneginf(l), torch.isneginf(want_lse))
        fin = torch.isfinite(want_lse)
        torch.testing.assert_close(l[fin], want_lse[fin], rtol=0, atol=1e-12)
    real_q = kp[:, nk - nq:]
    assert (got[~real_q[:, None, :].expand(b, H, nq)] == 0).all()  # padded query rows output zeros
    dout = torch.randn_like(got)
    params = [q, k, v] + ([logits] if sinks else [])
    g_got = torch.autograd.grad((got * dout).sum(), params)
    g_want = torch.autograd.grad((want * dout).sum(), [qf, k, v] + ([logits] if sinks else []))
    g_want = (g_want[0][:, :, nk - nq:],) + tuple(g_want[1:])
    for a, w in zip(g_got, g_want):
        assert w.abs().max() > 0
        torch.testing.assert_close(a, w, rtol=0, atol=1e-12)


def test_decode_key_padding_never_reads_padded_keys():
    nk = 9
    kp = _left_padding(2, nk, [4, 0])
    attn = sf.compile(sf.Causal(), sf.Problem(grid=nk, heads=H, kv_heads=KVH, head_dim=D, dtype=torch.float32))
    q, k, v = (t.detach().float() for t in _qkv(2, 1, nk))
    clean = attn(q, k, v, key_padding_mask=kp)
    k[0, :, :4], v[0, :, :4] = float("nan"), float("inf")
    dirty = attn(q, k, v, key_padding_mask=kp)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_cross_key_padding_on_other_grids_masks_keys_only():
    """Position-free keys (image x text): the mask removes keys; no query row is padding."""
    problem = sf.Problem(grid=6, kv_grid=5, heads=H, kv_heads=KVH, head_dim=D, dtype=torch.float64)
    attn = sf.compile(sf.Full(), problem)
    q, k, v = _qkv(2, 6, 5)
    kp = torch.tensor([[True, True, False, True, False], [True] * 5])
    got = attn(q, k, v, key_padding_mask=kp)
    want = sf.reference_attention(q[:1], k[:1, :, [0, 1, 3]], v[:1, :, [0, 1, 3]], sf.Full(),
                                  sf.Problem(grid=6, kv_grid=3, heads=H, kv_heads=KVH, head_dim=D,
                                             dtype=torch.float64))
    torch.testing.assert_close(got[:1], want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1:], attn(q[1:], k[1:], v[1:]), rtol=0, atol=1e-12)


def test_cross_padding_refusals():
    attn = sf.compile(sf.Causal(), sf.Problem(grid=8, heads=H, kv_heads=KVH, head_dim=D, dtype=torch.float32))
    q, k, v = (t.detach().float() for t in _qkv(2, 1, 8))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \[2, 1\], expected \[B=2, N=8\]"):
        attn(q, k, v, key_padding_mask=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="lengths is not supported with kv_grid"):
        attn(q, k, v, lengths=torch.tensor([8, 5]))


# ------------------------------------------------------------------------------------
# transformers
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the integration needs transformers >= 5")
    from sparseforge.integrations import transformers as sf_hf

    sf_hf.register()
    return transformers


SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _configs(t):
    gemma = dict(SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"])
    return {
        "llama": lambda: t.LlamaConfig(**SMALL),
        "mistral": lambda: t.MistralConfig(**SMALL, sliding_window=4),
        "qwen2": lambda: t.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                       layer_types=["full_attention", "sliding_attention"]),
        "qwen3": lambda: t.Qwen3Config(**SMALL, head_dim=8, use_sliding_window=True, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"]),
        "gemma2": lambda: t.Gemma2Config(**gemma, attn_logit_softcapping=2.0, final_logit_softcapping=30.0),
        "gemma3": lambda: t.Gemma3TextConfig(**gemma),
        "gpt_oss": lambda: t.GptOssConfig(**dict(SMALL, head_dim=8, num_local_experts=2, num_experts_per_tok=2,
                                                 sliding_window=4, layer_types=["sliding_attention",
                                                                                "full_attention"])),
        "modernbert": lambda: t.ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, local_attention=4,
                                                 layer_types=["full_attention", "sliding_attention"],
                                                 max_position_embeddings=64, pad_token_id=0),
    }


CAUSAL = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt_oss"]
MODELS = CAUSAL + ["modernbert"]


def _pair(t, name, seed=0):
    """(eager model, sparseforge model) of one random init, in eval mode, float32."""
    cfg = _configs(t)[name]()
    auto = t.AutoModelForMaskedLM if name == "modernbert" else t.AutoModelForCausalLM
    torch.manual_seed(seed)
    eager = auto.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = auto.from_config(copy.deepcopy(cfg), attn_implementation="sparseforge").eval()
    ours.load_state_dict(eager.state_dict())
    if name == "gpt_oss":  # sinks start at zero: make them matter (and differ per head)
        with torch.no_grad():
            for m in (eager, ours):
                for layer in m.model.layers:
                    layer.self_attn.sinks.copy_(torch.linspace(-1.0, 1.5, layer.self_attn.sinks.numel()))
    return eager, ours


def _batch(name, b=3, n=10, seed=0):
    """ids and attention mask: left padding for causal LMs, right padding for ModernBERT."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, n), generator=g)
    am = torch.ones(b, n, dtype=torch.long)
    for i, p in enumerate([0, 3, 6][:b]):
        if name == "modernbert":
            am[i, n - p:] = 0
        else:
            am[i, :p] = 0
    ids[am == 0] = 0
    return ids, am


def _terms(cfg, n):
    return cfg.num_hidden_layers * (cfg.hidden_size + cfg.intermediate_size + n)


def _max_row_error(got, want):
    return float(row_errors(got, want).max())


def _labels(ids, am, name):
    """Labels of the real tokens; for causal LMs also not the first real token, which the last
    pad position would predict (a pad row's output is padding: zeros here, eager's uniform mix)."""
    keep = am.bool()
    if name != "modernbert":
        keep = keep & torch.cat([torch.zeros_like(keep[:, :1]), keep[:, :-1]], dim=1)
    return ids.masked_fill(~keep, -100)


def _run(model, ids, am, name):
    labels = _labels(ids, am, name)
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    model.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


#: measured max errors, printed by test_models_match_eager (-s) for the README table
RESULTS: dict = {}


@pytest.mark.parametrize("name", MODELS)
def test_models_match_eager(hf, name):
    from sparseforge.integrations import transformers as sf_hf

    eager, ours = _pair(hf, name)
    ids, am = _batch(name)
    want_logits, want_grads = _run(eager, ids, am, name)
    got_logits, got_grads = _run(ours, ids, am, name)
    tol = tolerance(torch.float32, _terms(eager.config, ids.shape[1]))
    real = am.bool()
    logit_err = _max_row_error(got_logits[real], want_logits[real])
    assert logit_err <= tol, (name, logit_err, tol)
    assert set(got_grads) == set(want_grads)
    grad_err = 0.0
    for pname, want in want_grads.items():
        assert want.abs().max() > 0 or "bias" in pname, pname  # every parameter gets a gradient
        err = _max_row_error(got_grads[pname], want)  # rows along the last dimension
        grad_err = max(grad_err, err)
        assert err <= tol, (name, pname, err, tol)
    if name == "gpt_oss":
        sinks = [p for p in want_grads if p.endswith("sinks")]
        assert sinks and all(want_grads[p].abs().min() > 0 for p in sinks)
    # the sparseforge model really ran on sparseforge: a wrong pattern would not pass
    assert sf_hf.compiled_count() > 0
    RESULTS.setdefault(name, {}).update(logits=logit_err, grads=grad_err, tol=tol)
    print(f"\n{name}: logits max row error {logit_err:.2e}, gradients {grad_err:.2e} (tolerance {tol:.2e})")


@pytest.mark.parametrize("name", CAUSAL)
def test_generate_matches_eager(hf, name):
    from sparseforge.integrations import transformers as sf_hf

    eager, ours = _pair(hf, name, seed=1)
    ids, am = _batch(name, seed=1)
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = eager.generate(ids, **kw)
    before = sf_hf.compiled_count()
    got = ours.generate(ids, **kw)
    after_first = sf_hf.compiled_count()
    got_again = ours.generate(ids, **kw)
    assert torch.equal(got, want), (name, got[:, ids.shape[1]:].tolist(), want[:, ids.shape[1]:].tolist())
    assert torch.equal(got_again, got)
    assert sf_hf.compiled_count() == after_first  # the decode loop and a second generate compile nothing
    assert after_first - before <= 4  # (pattern per layer kind) x (with / without softcap, sinks)
    print(f"\n{name}: generate {got.shape[1] - ids.shape[1]} tokens x {ids.shape[0]} samples, same as eager")


def _record(hf, name):
    """Wrap the registered attention function to record (layer, q, k, v, padding, out) per call."""
    from sparseforge.integrations.transformers import MaskInfo

    mapping = hf.AttentionInterface._global_mapping
    inner = mapping[name]
    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, w = inner(module, query, key, value, attention_mask, **kwargs)
        pad = attention_mask.padding if isinstance(attention_mask, MaskInfo) else None
        calls.append((module.layer_idx, query.detach(), key.detach(), value.detach(), pad, out.detach(),
                      kwargs.get("scaling")))
        return out, w

    mapping[name] = recording
    return calls, lambda: mapping.__setitem__(name, inner)


def test_per_layer_pattern(hf):
    """register(patterns={1: StridedShards & Causal}): layer 1 attends with that pattern (the
    float64 reference of it, with the key padding), layer 0 keeps the model's causal mask;
    generation with the KV cache (decode alignment) gives the tokens of generation without it."""
    from sparseforge.integrations import transformers as sf_hf

    name = sf_hf.register(patterns={1: SHARDS}, name="sparseforge_shards")
    try:
        cfg = _configs(hf)["llama"]()
        torch.manual_seed(0)
        model = hf.AutoModelForCausalLM.from_config(cfg, attn_implementation=name).eval()
        ids, am = _batch("llama", n=12)
        calls, restore = _record(hf, name)
        try:
            model(input_ids=ids, attention_mask=am)
        finally:
            restore()
        assert [c[0] for c in calls] == [0, 1]
        for layer, q, k, v, pad, out, scale in calls:
            problem = sf.Problem(grid=q.shape[2], heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3])
            pattern = SHARDS if layer == 1 else sf.Causal()
            want = sf.reference_attention(q, k, v, pattern, problem, scale=scale, key_padding_mask=pad)
            got = out.transpose(1, 2)
            real = pad[:, None, :, None].expand_as(got)
            torch.testing.assert_close(got[real].double(), want[real], rtol=0, atol=1e-5)
            other = sf.reference_attention(q, k, v, sf.Causal() if layer == 1 else SHARDS, problem, scale=scale,
                                           key_padding_mask=pad)
            assert (got[real].double() - other[real]).abs().max() > 1e-3  # the pattern changed this layer
        kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        cached = model.generate(ids, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        # training: gradients flow through the chosen layer
        model.train()
        labels = _labels(ids, am, "llama")
        model(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        assert model.model.layers[1].self_attn.q_proj.weight.grad.abs().max() > 0
    finally:
        sf_hf.unregister(name)


def test_refusals(hf):
    from sparseforge.integrations import transformers as sf_hf

    cfg = _configs(hf)["llama"]()
    torch.manual_seed(0)
    model = hf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sparseforge").eval()
    ids, am = _batch("llama", b=2, n=8)
    # an arbitrary 4-D mask (additive bias values)
    bias = torch.randn(2, 1, 8, 8)
    with pytest.raises(NotImplementedError, match="additive bias values"):
        model(input_ids=ids, attention_mask=bias)
    # a boolean 4-D mask that is not the layer's pattern (bidirectional on a causal model)
    with pytest.raises(NotImplementedError, match=r"is not Causal\(\)"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))
    # ... while causal & padding as a 4-D mask is recognised
    causal4d = torch.ones(8, 8, dtype=torch.bool).tril()[None, None] & am.bool()[:, None, None, :]
    torch.testing.assert_close(model(input_ids=ids, attention_mask=causal4d).logits[am.bool()],
                               model(input_ids=ids, attention_mask=am).logits[am.bool()], rtol=0, atol=1e-6)
    # packed sequences (position ids restart, no attention mask): transformers' mask function differs
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(input_ids=ids, position_ids=pos, use_cache=False)
    # attention dropout in training
    cfg_drop = _configs(hf)["llama"]()
    cfg_drop.attention_dropout = 0.1
    dropping = hf.AutoModelForCausalLM.from_config(cfg_drop, attn_implementation="sparseforge").train()
    with pytest.raises(NotImplementedError, match="attention dropout"):
        dropping(input_ids=ids, attention_mask=am)
    dropping.eval()(input_ids=ids, attention_mask=am)  # no dropout at inference: runs
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=ids, attention_mask=am, output_attentions=True)
    with pytest.raises(ValueError, match="layer indices"):
        sf_hf.register(patterns={"1": sf.Causal()}, name="sf_bad")
    with pytest.raises(TypeError, match="Pattern"):
        sf_hf.register(patterns={1: "causal"}, name="sf_bad")


def test_bounded_check_still_catches_packed_sequences(hf, monkeypatch):
    """With the check bounded to the first and last query rows (a long prefill), a correct
    mask passes and packed sequences (a restart in the middle rows' positions) are still
    refused: the last rows see across the restart."""
    from sparseforge.integrations import transformers as sf_hf

    monkeypatch.setattr(sf_hf, "CHECK_PAIRS", 16)   # 8 x 8 pairs: rows 0 and 7 only
    cfg = _configs(hf)["llama"]()
    torch.manual_seed(0)
    model = hf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sparseforge").eval()
    ids, am = _batch("llama", b=2, n=8)
    model(input_ids=ids, attention_mask=am)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(input_ids=ids, position_ids=pos, use_cache=False)


def test_example_hf_generate(hf):
    """examples/hf_generate.py at tiny sizes: same tokens as eager; the shards variant runs its
    decode steps consistently with full recomputation."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "hf_generate.py"
    spec = importlib.util.spec_from_file_location("_example_hf_generate_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = ["--hidden", "32", "--prompt", "8", "--new-tokens", "4"]
    result = module.main(tiny + ["--sliding-window", "4"])
    assert result["same_as_eager"] and result["cache_consistent"]
    assert result["prefill_max_abs_err"] < 1e-4
    try:
        shards = module.main(tiny + ["--shards"])
        assert shards["cache_consistent"]
    finally:
        from sparseforge.integrations import transformers as sf_hf
        sf_hf.unregister("sparseforge_shards")
