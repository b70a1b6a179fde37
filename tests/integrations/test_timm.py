"""``sparseforge.integrations.timm.convert``: timm's Swin (v1, v2), MaxViT, HaloNet (stride 1 and
2), Twins (LSA, GSA) and NesT, small and randomly initialised (no downloads), converted in
place to sparseforge attention, compute what timm's eager model computes: logits and the loss
gradient of every parameter (relative position tables, Swin V2's logit scale and CPB MLP,
HaloNet's relative embeddings included) against timm's own eager model in float64.

Tolerances (``sparseforge.runtime.check``): an error is the largest row error (per sample for
the logits, per row of each parameter's gradient) against the float64 eager model; the
converted fp32 model passes where that error is at most ``tolerance(fp32, terms)`` (``terms``:
the longest reduction in the model) or at most ``EAGER_FACTOR`` times the error of timm's own
fp32 eager model on the same parameter (the same math in the same dtype: a gradient that
softmax cancels, such as a per-head constant bias, is rounding noise in both). A missing or
extra key moves a row by ~1/sqrt(keys) (>= 1e-2 here) and a zero gradient by 1: both fail.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparseforge.runtime.check import row_error, tolerance


timm = pytest.importorskip("timm")  # torchvision first: tests/integrations/conftest.py

from sparseforge.integrations.timm import ConversionReport, convert  # noqa: E402

#: The converted model may be this many times less accurate than timm's own fp32 model.
EAGER_FACTOR = 4.0
#: timm's own fp32 gradient with a larger error than this has no correct digit (cancelled).
CANCELLED = 1e-2
BATCH = 2
CLASSES = 10


# ------------------------------------------------------------------------------------
# The models: tiny, random, each exercising its family's variants
# ------------------------------------------------------------------------------------
def swin_v1():
    from timm.models.swin_transformer import SwinTransformer
    # 15x15 tokens, window 5, shift 2: offset 2 (not window - shift = 3) is what timm's roll means
    return SwinTransformer(img_size=30, patch_size=2, window_size=5, embed_dim=32, depths=(2,), num_heads=(2,),
                           num_classes=CLASSES), 30


def swin_v1_padded():
    from timm.models.swin_transformer import SwinTransformer
    # 14x14 tokens, window 4: the plain block is padded as timm pads; the shifted one is skipped
    return SwinTransformer(img_size=28, patch_size=2, window_size=4, embed_dim=32, depths=(2,), num_heads=(2,),
                           num_classes=CLASSES), 28


def swin_v2():
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    return SwinTransformerV2(img_size=30, patch_size=2, window_size=5, embed_dim=32, depths=(2,), num_heads=(2,),
                             num_classes=CLASSES), 30


def _maxvit(rel_pos_type, head_first, nchw):
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitTransformerCfg
    cfg = MaxxVitCfg(embed_dim=(32,), depths=(1,), block_type=("M",), stem_width=16,
                     transformer_cfg=MaxxVitTransformerCfg(dim_head=16, window_size=4, rel_pos_type=rel_pos_type,
                                                           rel_pos_dim=32, head_first=head_first,
                                                           use_nchw_attn=nchw))
    return MaxxVit(cfg, img_size=32, num_classes=CLASSES), 32     # 8x8 tokens: Blocks(4) and Grid(4)


def maxvit_bias():
    return _maxvit("bias", True, False)


def maxvit_mlp_nchw():
    return _maxvit("mlp", True, True)


def maxvit_bias_tf():
    return _maxvit("bias_tf", False, False)


def halonet():
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg
    # stage 1: 8x8 tokens, HaloAttn stride 1; stage 2: a stride-2 HaloAttn (queries 4x4, keys 8x8)
    cfg = ByoModelCfg(blocks=(ByoBlockCfg(type="self_attn", d=1, c=32, s=1, gs=0, br=0.5),
                              ByoBlockCfg(type="self_attn", d=1, c=64, s=2, gs=0, br=0.5)),
                      stem_chs=16, stem_type="7x7", stem_pool="maxpool", self_attn_layer="halo",
                      self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=2))
    return ByobNet(cfg, num_classes=CLASSES), 32


def twins():
    # 12x12 then 6x6 tokens; LSA windows of 5 and 4: both padded as timm pads; GSA pooled 4x4 / 2x2
    return timm.create_model("twins_svt_small", img_size=48, num_classes=CLASSES, embed_dims=(32, 64), depths=(2, 2),
                             num_heads=(1, 2), mlp_ratios=(2, 2), sr_ratios=(4, 2), wss=(5, 4)), 48


def nest():
    from timm.models.nest import Nest
    return Nest(img_size=32, patch_size=4, num_levels=2, embed_dims=(32, 64), num_heads=(2, 2), depths=(1, 1),
                num_classes=CLASSES), 32


#: name -> (factory, {converted module class: count}, {skipped module class: count})
MODELS = {
    "swin_v1": (swin_v1, {"SwinTransformerBlock": 2}, {}),
    "swin_v1_padded": (swin_v1_padded, {"SwinTransformerBlock": 1}, {"SwinTransformerBlock": 1}),
    "swin_v2": (swin_v2, {"SwinTransformerV2Block": 2}, {}),
    "maxvit_bias": (maxvit_bias, {"PartitionAttentionCl": 2}, {}),
    "maxvit_mlp_nchw": (maxvit_mlp_nchw, {"PartitionAttention2d": 2}, {}),
    "maxvit_bias_tf": (maxvit_bias_tf, {"PartitionAttentionCl": 2}, {}),
    "halonet": (halonet, {"HaloAttn": 2}, {}),
    "twins": (twins, {"LocallyGroupedAttn": 2, "GlobalSubSampleAttn": 2}, {}),
    "nest": (nest, {"Attention": 2}, {}),
}


def build(name: str, seed: int = 0):
    """The model (eval mode: batch norms use their running statistics), its parameters moved
    off their initial values (zero biases, unit norms, zero-initialised q/v biases would hide a
    term the conversion drops), and its input size."""
    torch.manual_seed(seed)
    model, size = MODELS[name][0]()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return model.eval(), size


def inputs(size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(BATCH, 3, size, size, generator=gen, dtype=torch.float64)
    target = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    return x, target


def forward_backward(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """Logits and the cross-entropy loss's gradient of every parameter (by name)."""
    model.zero_grad(set_to_none=True)
    logits = model(x)
    nn.functional.cross_entropy(logits, target).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def longest_reduction(model: nn.Module, size: int) -> int:
    """The longest sum in the model: a layer's fan-in, or the tokens a weight's gradient sums over."""
    fan_in = max((m.weight[0].numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), default=1)
    return max(fan_in, BATCH * (size // 2) ** 2)


_CASES: dict[str, dict] = {}


def case(name: str) -> dict:
    """Eager fp32, eager fp64 and converted fp32 results of one model (computed once)."""
    if name in _CASES:
        return _CASES[name]
    model, size = build(name)
    converted = copy.deepcopy(model)
    report = convert(converted)
    x, target = inputs(size)
    ref64 = forward_backward(copy.deepcopy(model).double(), x, target)
    eager = forward_backward(model, x.float(), target)
    got = forward_backward(converted, x.float(), target)
    _CASES[name] = dict(model=model, converted=converted, report=report, size=size, x=x, target=target,
                        ref64=ref64, eager=eager, got=got, tol=tolerance(torch.float32, longest_reduction(model, size)))
    return _CASES[name]


def _errors(name: str):
    """(tensor, error of the converted fp32 model, error of timm's fp32 model, max |converted -
    timm fp32| relative to timm's max) for the logits and every parameter's gradient. A gradient
    that softmax cancels (a per-head constant such as RelPosMlp's last bias: true value ~0, timm's
    own fp32 value has no correct digit) is measured against the gradients of its module's
    other parameters, the size of the terms that cancel."""
    c = case(name)
    (l64, g64), (l32, g32), (lgot, ggot) = c["ref64"], c["eager"], c["got"]
    rows = [("logits", row_error(lgot, l64), row_error(l32, l64), (lgot - l32).abs().max().item())]
    for n, want in g64.items():
        assert ggot[n] is not None, f"{name}: no gradient reached {n} in the converted model"
        assert torch.isfinite(ggot[n]).all(), f"{name}: non-finite gradient of {n}"
        scale = None
        if row_error(g32[n], want) > CANCELLED:
            parent = n.rpartition(".")[0]
            siblings = [g for m, g in g64.items() if m != n and m.rpartition(".")[0] == parent]
            assert siblings, f"{name}: {n}'s gradient is rounding noise and has no sibling to measure it by"
            floor = max(g.reshape(-1, g.shape[-1] if g.dim() else 1).norm(dim=-1).max() for g in siblings)
            scale = torch.full((want.numel() // (want.shape[-1] if want.dim() else 1),), floor.item())
        rows.append((n, row_error(ggot[n], want, scale), row_error(g32[n], want, scale),
                     ((ggot[n] - g32[n]).abs().max() / g32[n].abs().max().clamp_min(1e-30)).item()))
    return rows


# ------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_every_gradient_match_timm(name):
    c = case(name)
    rows = _errors(name)
    assert len(rows) == 1 + sum(1 for p in c["model"].parameters() if p.requires_grad)
    bad = [(n, got, eager) for n, got, eager, _ in rows if not got <= max(c["tol"], EAGER_FACTOR * eager)]
    assert not bad, f"{name}: (tensor, error of the converted model, of timm's fp32 model) above tol {c['tol']:.2e}: {bad}"


@pytest.mark.parametrize("name", list(MODELS))
def test_report_lists_the_converted_modules(name):
    c = case(name)
    report = c["report"]
    assert isinstance(report, ConversionReport)
    _, want_converted, want_skipped = MODELS[name]
    got = {}
    for m in report.converted:
        got[m.timm_class] = got.get(m.timm_class, 0) + 1
        assert m.pattern
    assert got == want_converted, str(report)
    skipped = {}
    for s in report.skipped:
        skipped[s.timm_class] = skipped.get(s.timm_class, 0) + 1
        assert s.reason
    assert skipped == want_skipped, str(report)
    modules = dict(c["converted"].named_modules())
    for m in report.converted:
        assert type(modules[m.name]).__name__ == "Sparse" + m.timm_class      # its forward is sparseforge's
    for s in report.skipped:
        assert type(modules[s.name]).__name__ == s.timm_class                 # left as timm made it
    assert str(report).startswith(f"converted {len(report.converted)} module(s)")


def test_skipped_swin_block_says_why():
    report = case("swin_v1_padded")["report"]
    (skipped,) = report.skipped
    assert skipped.name == "layers.0.blocks.1"
    assert "not a multiple of the window" in skipped.reason and "shifted" in skipped.reason
    (converted,) = report.converted
    assert "zero-padded" in converted.pattern


@pytest.mark.parametrize("name", ["swin_v1", "swin_v2", "maxvit_bias", "halonet"])
def test_parameters_are_kept(name):
    """Same parameter objects' names, shapes and values; relative position tables stay
    trainable nn.Parameters that receive their gradient; state_dicts load both ways."""
    c = case(name)
    model, converted = c["model"], c["converted"]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in converted.named_parameters()]
    sd = converted.state_dict()
    assert list(sd) == list(model.state_dict())
    model_copy = copy.deepcopy(model)
    model_copy.load_state_dict(sd)
    converted.load_state_dict(model.state_dict())
    grads = c["got"][1]
    tables = [n for n, p in converted.named_parameters()
              if n.endswith(("relative_position_bias_table", "height_rel", "width_rel", "logit_scale"))]
    assert tables, name
    for n in tables:
        p = dict(converted.named_parameters())[n]
        assert isinstance(p, nn.Parameter) and p.requires_grad
        assert grads[n].abs().max() > 0, n


def test_convert_twice_converts_nothing_new():
    model, _ = build("twins")
    first = convert(model)
    again = convert(model)
    assert len(first.converted) == 4 and again.converted == [] and again.skipped == []


def test_attention_dropout_is_skipped_with_its_reason():
    from timm.models.swin_transformer import SwinTransformer
    model = SwinTransformer(img_size=30, patch_size=2, window_size=5, embed_dim=32, depths=(2,), num_heads=(2,),
                            num_classes=CLASSES, attn_drop_rate=0.1)
    report = convert(model)
    assert report.converted == [] and len(report.skipped) == 2
    assert all("attention dropout" in s.reason for s in report.skipped)


def test_another_input_resolution():
    """A converted model at another input resolution than it was built for (timm's Twins and
    HaloNet accept any multiple of their windows/blocks): still timm's function."""
    for name, size in (("twins", 64), ("halonet", 48)):
        model, _ = build(name)
        converted = copy.deepcopy(model)
        convert(converted)
        x, _ = inputs(size)
        with torch.no_grad():
            want, got = model.double()(x), None
            converted.float()
            got = converted(x.float())
        assert row_error(got, want) <= tolerance(torch.float32, longest_reduction(model, size)) * 10, name


def test_torch_compile_matches_eager():
    """A converted Swin (relative position tables and shifted windows) under torch.compile
    (after one eager call, which compiles the patterns)."""
    c = case("swin_v1")
    converted = c["converted"]
    x = c["x"].float()
    with torch.no_grad():
        want = c["model"](x)
        compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
        got = compiled(x)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    got.sum()  # a tensor, not a graph break artefact
    compiled.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(compiled(x), c["target"]).backward()
    table = "layers.0.blocks.1.attn.relative_position_bias_table"
    want_grad = c["eager"][1][table]
    got_grad = dict(converted.named_parameters())[table].grad
    assert row_error(got_grad, want_grad) <= max(c["tol"], 1e-4)


def test_error_table(capsys):
    """Prints the models x (logits, gradient) error table (pytest -s shows it)."""
    lines = [f"{'model':18} {'logits max |diff|':>18} {'logits err':>11} {'grad err':>10} {'worst grad (eager fp32)':>24}"]
    for name in MODELS:
        rows = _errors(name)
        logits = rows[0]
        worst = max(rows[1:], key=lambda r: r[1] / max(case(name)["tol"], EAGER_FACTOR * r[2]))
        lines.append(f"{name:18} {logits[3]:18.2e} {logits[1]:11.2e} {max(r[1] for r in rows[1:]):10.2e} "
                     f"{worst[1]:11.2e} ({worst[2]:.2e}) {worst[0]}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_the_check_fails_on_a_wrong_conversion(monkeypatch):
    """Negative controls: Swin's shifted windows started at window - shift (3) instead of at
    shift (2, what timm's roll means), and a relative position table whose gradient is zeroed,
    both fail the criterion the tests above apply."""
    import sparseforge.integrations.timm as integration
    from sparseforge import Blocks

    c = case("swin_v1")
    monkeypatch.setattr(integration, "_COMPILED", {})           # keep the wrong patterns out of the cache
    plan = integration._swin_plan
    monkeypatch.setattr(integration, "_swin_plan", lambda window, shift, grid: (
        plan(window, shift, grid)[0], Blocks(window, offset=tuple((w - s) % w for w, s in zip(window, shift)))))
    model, _ = build("swin_v1")
    convert(model)
    logits, grads = forward_backward(model, c["x"].float(), c["target"])
    l64, g64 = c["ref64"]
    assert row_error(logits, l64) > 10 * c["tol"]
    table = "layers.0.blocks.1.attn.relative_position_bias_table"
    assert row_error(grads[table], g64[table]) > 10 * c["tol"]
    zeroed = torch.zeros_like(c["got"][1][table])
    assert row_error(zeroed, g64[table]) >= 1.0 > max(c["tol"], EAGER_FACTOR * row_error(c["eager"][1][table], g64[table]))
