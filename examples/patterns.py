"""A named example of every sparseforge pattern family.

Each name works as ``sparseforge show examples/patterns.py:NAME --grid ...``; the comment
above it names the paper or library it follows and the token grid it is meant for. They
double as smoke tests (tests/cli/test_show.py draws each one on a small grid).
"""
from sparseforge import (Blocks, Causal, Documents, GlobalTokens, Grid, Halo, Neighborhood, PerHead, Routed,
                         Scattered, SlidingWindow, Sink, StridedShards)

# NATTEN / DiNAT dilated neighborhood attention (Hassani et al. 2022): 7x7 window over every 2nd token; grid 56x56.
neighborhood_2d = Neighborhood(7, dilation=2)

# NATTEN 1-D neighborhood attention (a windowed sequence model): 129 keys, shifted inward at the ends; --seq 4096.
neighborhood_1d = Neighborhood(129)

# NATTEN 3-D neighborhood attention for video (as in Cosmos / generalized NA): 3x7x7 window; grid 8x28x28.
neighborhood_3d = Neighborhood((3, 7, 7))

# Longformer local attention (Beltagy et al. 2020): 256 keys each side, truncated at the ends; --seq 4096.
sliding_window = SlidingWindow(256, 256)

# StreamingLLM (Xiao et al. 2023): causal; each token sees itself, the 4096 before it and 4 attention sinks;
# --seq 32768.
causal_llm = Causal() & (SlidingWindow(4096) | Sink(4))

# HaloNet blocked local self-attention (Vaswani et al. 2021): 8x8 blocks with a 3-token halo; grid 64x64.
halo = Halo(block_size=8, halo=3)

# MaxViT block attention (Tu et al. 2022), i.e. Swin's unshifted windows: 7x7 blocks; grid 56x56.
blocks = Blocks(7)

# MaxViT grid attention (Tu et al. 2022): a 7x7 grid of tokens spread evenly over the map; grid 56x56.
grid = Grid(7)

# MaxViT-style per-head mix: 4 heads dilated neighborhood, 2 heads blocks, 2 heads grid; grid 28x28, --heads 8.
maxvit_heads = PerHead([neighborhood_2d] * 4 + [Blocks(7)] * 2 + [Grid(7)] * 2)

# S2-Attention / DKernel (Lin et al. 2024): 64-token blocks, 16 local blocks, vertical stride 8, heads take
# different shards; --seq 8192 --heads 8.
strided_shards = StridedShards(block_size=64, local_blocks=16, vertical_stride=8)

# Packed causal LM training (FlashAttention varlen / FlexAttention document masking): 4 documents; --seq 4096.
documents = Causal() & Documents([1024, 512, 2048, 512])

# Longformer (Beltagy et al. 2020): local window plus a global [CLS] token at index 0; --seq 4096.
global_tokens = SlidingWindow(256, 256) | GlobalTokens([0])

# BiFormer bi-level routing attention (Zhu et al. 2023): 56x56 map in 7x7 regions of 8x8 tokens, top-4 regions.
routed = Routed(region_size=8, topk=4)

# SST / DSVT-style scattered voxel windows (Fan et al. 2022): 12x12 windows shifted by 6 on a BEV map; voxel
# coordinates come at run time (`show --grid 48x48` makes every cell a voxel).
scattered = Scattered(window_size=12, shift=6)
