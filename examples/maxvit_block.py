"""A MaxViT-style block whose block-local and grid (dilated global) heads share ONE attention.

MaxViT (Tu et al. 2022) follows an MBConv with block attention (non-overlapping local
windows) and then grid attention (a sparse, evenly spread global grid), each in its own
layer. Here both run in a single ``sparseforge.nn.SparseAttention`` whose pattern is

    PerHead([Blocks(block)] * (heads - grid_heads) + [Grid(grid)] * grid_heads)

so some heads mix tokens inside ``block x block`` windows while the others mix tokens spaced
``size // grid`` apart over the whole feature map, in one fused op with shared projections.
The block (MBConv, optional, then pre-norm attention + MLP, all residual) runs forward and
backward on a random ``[B, C, H, W]`` feature map and prints the shapes, the per-head
statistics of the pattern and the gradient norms.

Run it (from the repository root)::

    python examples/maxvit_block.py                                 # 28x28 map, 7x7 blocks, 7x7 grid
    python examples/maxvit_block.py --size 8 --dim 32 --heads 2 --grid-heads 1 --block 4 --grid 4 \\
        --batch 1 --device cpu --no-mbconv

On CUDA the attention runs generated Triton kernels (head dim = dim / heads must be one of
16, 32, 64, 96, 128, 256); on CPU tensors it runs sparseforge's CPU executor.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import sparseforge as sf

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(scale))))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, squeeze-excite, 1x1 project (on [B, C, H, W])."""

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        hidden = dim * expansion
        self.norm = nn.BatchNorm2d(dim)
        self.expand = nn.Conv2d(dim, hidden, 1, bias=False)
        self.expand_norm = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.depthwise_norm = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, max(1, dim // 4))
        self.project = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.expand_norm(self.expand(self.norm(x))))
        y = F.gelu(self.depthwise_norm(self.depthwise(y)))
        return x + self.project(self.se(y))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * ratio)
        self.fc2 = nn.Linear(dim * ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def block_grid_pattern(heads: int, grid_heads: int, block: int, grid: int) -> sf.PerHead:
    """The first ``heads - grid_heads`` heads attend within blocks, the rest over the grid."""
    return sf.PerHead([sf.Blocks(block)] * (heads - grid_heads) + [sf.Grid(grid)] * grid_heads)


class MaxViTBlock(nn.Module):
    """[B, C, H, W] -> [B, C, H, W]: MBConv, then block + grid attention in one op, then an MLP."""

    def __init__(self, dim: int, heads: int, grid_heads: int, *, size: tuple[int, int], block: int, grid: int,
                 mbconv: bool = True):
        super().__init__()
        self.mbconv = MBConv(dim) if mbconv else nn.Identity()
        self.pattern = block_grid_pattern(heads, grid_heads, block, grid)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = sf.nn.SparseAttention(self.pattern, dim, heads, grid=size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mbconv(x).permute(0, 2, 3, 1)  # channels last: [B, H, W, C] tokens
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=28, help="feature map height and width")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--grid-heads", type=int, default=2, help="heads with grid attention; the rest use blocks")
    p.add_argument("--block", type=int, default=7, help="block (window) size per side")
    p.add_argument("--grid", type=int, default=7, help="grid attention: tokens per side each query sees")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-mbconv", action="store_true", help="attention and MLP only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    if not 0 <= args.grid_heads <= args.heads:
        p.error(f"--grid-heads must be between 0 and --heads {args.heads}, got {args.grid_heads}")
    if args.size % args.grid:
        p.error(f"--grid {args.grid} must divide --size {args.size}")
    if args.block > args.size:
        p.error(f"--block {args.block} is larger than --size {args.size}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    size = (args.size, args.size)
    block = MaxViTBlock(args.dim, args.heads, args.grid_heads, size=size, block=args.block, grid=args.grid,
                        mbconv=not args.no_mbconv).to(device=device, dtype=dtype)
    problem = block.attn.problem(size, dtype)
    print(sf.describe(block.pattern, problem))
    print(block.attn.attention(size, dtype).schedule.summary())

    x = torch.randn(args.batch, args.dim, *size, generator=torch.Generator().manual_seed(args.seed))
    x = x.to(device=device, dtype=dtype).requires_grad_()
    y = block(x)
    loss = y.float().square().mean()
    loss.backward()

    grad_norms = {name: p.grad.float().norm().item() for name, p in block.named_parameters() if p.grad is not None}
    missing = [name for name, p in block.named_parameters() if p.grad is None]
    print(f"input {tuple(x.shape)} -> output {tuple(y.shape)}, loss {loss.item():.4f}, "
          f"input grad norm {x.grad.float().norm().item():.4e}")
    for name, norm in grad_norms.items():
        print(f"  grad norm {name:32s} {norm:.4e}")
    if missing:
        print(f"  parameters without a gradient: {missing}")
    return {"input_shape": tuple(x.shape), "output_shape": tuple(y.shape), "loss": loss.item(),
            "input_grad_norm": x.grad.float().norm().item(), "grad_norms": grad_norms, "missing_grads": missing}


if __name__ == "__main__":
    main()
