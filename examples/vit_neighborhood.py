"""A small ViT whose attention is NATTEN-style neighborhood attention, trained for a few steps.

Shows ``sparseforge.nn.SparseAttention(sparseforge.Neighborhood(kernel), dim, heads, grid=(h, w))``
as a drop-in attention layer on a patch grid: a patch-embedding convolution turns images into
``[B, h, w, C]`` tokens, pre-norm transformer blocks (neighborhood attention + MLP) mix them,
and mean pooling + a linear head classify. The model is trained with AdamW on one fixed batch
of random images and random labels (it memorises them, so the loss should fall) and the loss
is printed at every step.

Run it (from the repository root)::

    python examples/vit_neighborhood.py                          # 64x64 images, 16x16 grid, Neighborhood(7)
    python examples/vit_neighborhood.py --steps 5 --image-size 16 --patch 4 --dim 32 --depth 1 --heads 2 \\
        --kernel 3 --batch 4 --device cpu

On CUDA the attention runs generated Triton kernels (head dim = dim / heads must be one of
16, 32, 64, 96, 128, 256); on CPU tensors it runs sparseforge's CPU executor. ``--dtype`` is
the dtype of the whole model (parameters and activations; ``float64`` on CPU only).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import sparseforge as sf

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches -> ``[B, h, w, dim]`` tokens."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).permute(0, 2, 3, 1)  # [B, C, h, w] -> [B, h, w, C]


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class NeighborhoodBlock(nn.Module):
    """Pre-norm transformer block with neighborhood attention on a fixed token grid."""

    def __init__(self, dim: int, heads: int, kernel: int, grid: tuple[int, int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = sf.nn.SparseAttention(sf.Neighborhood(kernel), dim, heads, grid=grid)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, h, w, C]
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class NeighborhoodViT(nn.Module):
    def __init__(self, *, image_size: int, patch: int, dim: int, depth: int, heads: int, kernel: int,
                 num_classes: int, in_channels: int = 3):
        super().__init__()
        side = image_size // patch
        self.grid = (side, side)
        self.patch_embed = PatchEmbed(in_channels, dim, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, side, side, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(NeighborhoodBlock(dim, heads, kernel, self.grid) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x).mean(dim=(1, 2))  # global average pooling over the patch grid
        return self.head(x)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kernel", type=int, default=7, help="neighborhood size per grid dimension")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = p.parse_args(argv)
    if args.image_size % args.patch:
        p.error(f"--image-size {args.image_size} must be a multiple of --patch {args.patch}")
    if args.kernel > args.image_size // args.patch:
        p.error(f"--kernel {args.kernel} is larger than the patch grid ({args.image_size // args.patch} per side)")
    if args.depth < 1 or args.steps < 0:
        p.error("--depth must be >= 1 and --steps >= 0")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    model = NeighborhoodViT(image_size=args.image_size, patch=args.patch, dim=args.dim, depth=args.depth,
                            heads=args.heads, kernel=args.kernel, num_classes=args.classes)
    model.to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ViT: {args.image_size}x{args.image_size} images, patch {args.patch} -> grid {model.grid}, "
          f"Neighborhood({args.kernel}), dim {args.dim}, {args.heads} heads, depth {args.depth}, "
          f"{n_params / 1e6:.2f}M parameters, {device} {args.dtype}")
    print(model.blocks[0].attn.attention(model.grid, dtype).schedule.summary())

    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    labels = torch.randint(args.classes, (args.batch,), generator=gen)
    images, labels = images.to(device=device, dtype=dtype), labels.to(device)

    # AdamW's default eps=1e-8 is 0 in float16 (0/0 -> NaN updates); bfloat16 has float32's range.
    eps = 1e-4 if dtype == torch.float16 else 1e-8
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=eps, weight_decay=0.05)
    initial = [p.detach().clone() for p in model.parameters()]
    losses: list[float] = []
    for step in range(args.steps):
        loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {losses[-1]:.4f}")

    finite = all(math.isfinite(v) for v in losses)
    changed = all(not torch.equal(p0, p.detach()) for p0, p in zip(initial, model.parameters()))
    grads_finite = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    if not finite:
        raise RuntimeError(f"non-finite loss: {losses}")
    if losses:
        trend = "decreased" if losses[-1] < losses[0] else "did not decrease"
        print(f"loss {trend}: {losses[0]:.4f} -> {losses[-1]:.4f} (chance level {math.log(args.classes):.4f})")
    return {"losses": losses, "params_changed": changed, "grads_finite": grads_finite, "grid": model.grid}


if __name__ == "__main__":
    main()
