"""Convert a timm vision model's attention to sparseforge, in place, and check it against timm.

``sparseforge.integrations.timm.convert(model)`` switches the attention of timm's Swin (v1, v2),
MaxViT, HaloNet, Twins and NesT to sparseforge patterns on the full token grid (shifted
windows as ``Blocks(window, offset=shift)``, MaxViT's ``Blocks``/``Grid``, ``Halo``, ...) and
keeps every parameter. This script builds a tiny, randomly initialised model (no download),
converts a copy, prints the report and the largest difference of the logits and of the
parameter gradients against timm's own eager model.

Run it (from the repository root; needs ``pip install timm``)::

    python examples/timm_convert.py                     # Swin v1
    python examples/timm_convert.py --model halonet     # swin, swinv2, maxvit, halonet, twins, nest

On CPU tensors the converted attention runs sparseforge's CPU executor; ``--device cuda`` runs
the generated Triton kernels (HaloNet stride 2 and Twins' pooled keys use ``kv_grid``, which
runs on the CPU executor only for now).
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from sparseforge.compat import import_torchvision

MODELS = ("swin", "swinv2", "maxvit", "halonet", "twins", "nest")


def _import_timm():
    """timm (its torchvision imported first, also where its wheel does not match this torch)."""
    import_torchvision()
    import timm
    return timm


def build(name: str, classes: int = 10) -> tuple[nn.Module, int]:
    """A tiny random timm model of family ``name`` and its input size."""
    timm = _import_timm()
    if name == "swin":
        from timm.models.swin_transformer import SwinTransformer
        return SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2),
                               num_heads=(2, 4), num_classes=classes), 32
    if name == "swinv2":
        from timm.models.swin_transformer_v2 import SwinTransformerV2
        return SwinTransformerV2(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2),
                                 num_heads=(2, 4), num_classes=classes), 32
    if name == "maxvit":
        from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitTransformerCfg
        cfg = MaxxVitCfg(embed_dim=(32, 64), depths=(1, 1), block_type=("M", "M"), stem_width=16,
                         transformer_cfg=MaxxVitTransformerCfg(dim_head=16, window_size=4))
        return MaxxVit(cfg, img_size=64, num_classes=classes), 64
    if name == "halonet":
        from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg
        cfg = ByoModelCfg(blocks=(ByoBlockCfg(type="self_attn", d=1, c=32, s=1, gs=0, br=0.5),
                                  ByoBlockCfg(type="self_attn", d=1, c=64, s=2, gs=0, br=0.5)),
                          stem_chs=16, stem_type="7x7", stem_pool="maxpool", self_attn_layer="halo",
                          self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=2))
        return ByobNet(cfg, num_classes=classes), 32
    if name == "twins":
        return timm.create_model("twins_svt_small", img_size=64, num_classes=classes, embed_dims=(32, 64),
                                 depths=(2, 2), num_heads=(1, 2), mlp_ratios=(2, 2), sr_ratios=(4, 2),
                                 wss=(4, 4)), 64
    if name == "nest":
        from timm.models.nest import Nest
        return Nest(img_size=32, patch_size=4, num_levels=2, embed_dims=(32, 64), num_heads=(2, 2),
                    depths=(1, 1), num_classes=classes), 32
    raise ValueError(f"--model must be one of {MODELS}, got {name!r}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="swin")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _import_timm()
    from sparseforge.integrations.timm import convert

    torch.manual_seed(args.seed)
    model, size = build(args.model)
    model = model.to(args.device).eval()
    converted = copy.deepcopy(model)
    report = convert(converted)
    print(report)

    x = torch.randn(args.batch, 3, size, size, device=args.device)
    target = torch.randint(0, 10, (args.batch,), device=args.device)
    results = []
    for m in (model, converted):
        logits = m(x)
        nn.functional.cross_entropy(logits, target).backward()
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    logits_diff = (got - want).abs().max().item()
    grad_diff = max((got_grads[n] - g).abs().max().item() / g.abs().max().clamp_min(1e-30).item()
                    for n, g in want_grads.items())
    print(f"logits: max |converted - timm| = {logits_diff:.2e} (logits up to {want.abs().max().item():.2e})")
    print(f"gradients: max |converted - timm| / max |timm| per parameter = {grad_diff:.2e} "
          f"({len(want_grads)} parameters; missing in the converted model: "
          f"{sorted(set(want_grads) - set(got_grads)) or 'none'})")
    return {"report": report, "logits_diff": logits_diff, "grad_diff": grad_diff,
            "missing_grads": sorted(set(want_grads) - set(got_grads))}


if __name__ == "__main__":
    main()
