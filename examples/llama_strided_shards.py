"""A Llama-style decoder whose attention is S2-Attention's strided shards plus attention sinks.

Shows ``sparseforge.compile`` used directly inside a model: each decoder block (RMSNorm,
rotary position embeddings, grouped-query attention with fewer key/value heads than query
heads, SwiGLU MLP) attends under

    Causal() & (StridedShards(block_size, local_blocks, vertical_stride) | Sink(n))

i.e. DKernel's "local + vertical stride" block layout (heads take different shards) plus the
first ``n`` tokens as attention sinks. ``StridedShards`` is causal by itself, but ``Sink(n)``
is not (it shows the first ``n`` keys to every query, token 0 included), so the union is
intersected with ``Causal()`` to keep the decoder autoregressive. ``compile`` is called
because ``sparseforge.nn.SparseAttention`` has no hook for rotary embeddings between the
projections and the attention.

The example runs forward and backward (next-token loss on random tokens), prints the output
shape, the loss and the gradient norms, and checks the first block's compiled attention
against ``sparseforge.reference_attention`` (float64) on the same q, k, v.

Run it (from the repository root)::

    python examples/llama_strided_shards.py                       # 512 tokens, 8 heads, 2 kv heads
    python examples/llama_strided_shards.py --seq 128 --heads 4 --kv-heads 2 --head-dim 16 --block-size 16 \\
        --device cpu --dtype float64

On CUDA the attention runs generated Triton kernels (head dim one of 16, 32, 64, 96, 128,
256; float16, bfloat16 or float32); on CPU tensors it runs sparseforge's CPU executor, which
also takes float64. The compiled op is built for one sequence length (``--seq``).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import sparseforge as sf

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (rotate-half convention) for positions 0 .. seq_len - 1."""

    def __init__(self, head_dim: int, seq_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # [N, D]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, H, N, D]
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return x * cos + rotate_half(x) * sin


class StridedShardsAttention(nn.Module):
    """Grouped-query attention (``kv_heads`` < ``heads``) under a compiled sparseforge pattern."""

    def __init__(self, dim: int, heads: int, kv_heads: int, seq_len: int, pattern: sf.Pattern, dtype: torch.dtype):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, seq_len)
        self.pattern = pattern
        self.problem = sf.Problem(grid=seq_len, heads=heads, kv_heads=kv_heads, head_dim=self.head_dim, dtype=dtype)
        self.attend = sf.compile(pattern, self.problem)  # q [B, H, N, D], k/v [B, KVH, N, D] -> [B, H, N, D]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (both rotated) and v, heads first: [B, H, N, D] and [B, KVH, N, D]."""
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return self.rope(q), self.rope(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        out = self.attend(*self.project(x))
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, seq_len: int, pattern: sf.Pattern, dtype: torch.dtype):
        super().__init__()
        hidden = 64 * math.ceil(8 * dim / 3 / 64)  # Llama's 2/3 * 4 * dim, rounded up to a multiple of 64
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.attn = StridedShardsAttention(dim, heads, kv_heads, seq_len, pattern, dtype)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, *, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, seq_len: int,
                 pattern: sf.Pattern, dtype: torch.dtype):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DecoderBlock(dim, heads, kv_heads, seq_len, pattern, dtype) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N] -> logits [B, N, vocab]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=512, help="sequence length (the compiled op is built for it)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA); must divide --heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16, help="StridedShards block size in tokens")
    p.add_argument("--local-blocks", type=int, default=4, help="local blocks, the current one included")
    p.add_argument("--vertical-stride", type=int, default=4)
    p.add_argument("--sink", type=int, default=4, help="attention-sink tokens")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the float64 reference")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16" if cuda else "float32")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    if args.head_dim % 2:
        p.error(f"--head-dim {args.head_dim} must be even (rotary embeddings rotate pairs of channels)")
    if args.sink > args.seq:
        p.error(f"--sink {args.sink} is more than --seq {args.seq} tokens")
    if args.layers < 1:
        p.error("--layers must be >= 1")
    return args


def strided_shards_with_sinks(block_size: int, local_blocks: int, vertical_stride: int, sink: int) -> sf.Pattern:
    """DKernel's strided shards plus ``sink`` attention sinks, kept causal (``Sink`` alone is not)."""
    shards = sf.StridedShards(block_size=block_size, local_blocks=local_blocks, vertical_stride=vertical_stride)
    return sf.Causal() & (shards | sf.Sink(sink))


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm()).item()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    pattern = strided_shards_with_sinks(args.block_size, args.local_blocks, args.vertical_stride, args.sink)
    dim = args.heads * args.head_dim
    model = TinyLlama(vocab=args.vocab, dim=dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                      seq_len=args.seq, pattern=pattern, dtype=dtype).to(device=device, dtype=dtype)
    attn = model.layers[0].attn
    print(f"pattern {pattern!r} on {attn.problem!r}, device {device}")
    print(attn.attend.schedule.summary())

    tokens = torch.randint(args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(args.seed))
    tokens = tokens.to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    logits = model(inputs)
    loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), targets.reshape(-1))
    loss.backward()
    grad_norms = {name: p.grad.float().norm().item() for name, p in model.named_parameters() if p.grad is not None}
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    print(f"logits {tuple(logits.shape)}, loss {loss.item():.4f} (uniform guess {math.log(args.vocab):.4f})")
    for name, norm in grad_norms.items():
        print(f"  grad norm {name:32s} {norm:.4e}")
    if missing:
        print(f"  parameters without a gradient: {missing}")

    rel_err = None
    if not args.no_check:
        with torch.no_grad():
            q, k, v = attn.project(model.layers[0].attn_norm(model.embed(inputs)))
            got = attn.attend(q, k, v)
            want = sf.reference_attention(q, k, v, pattern, attn.problem)
        rel_err = rel_error(got, want)
        print(f"attention vs float64 reference_attention: relative error {rel_err:.3e} ({args.dtype})")

    return {"logits_shape": tuple(logits.shape), "loss": loss.item(), "grad_norms": grad_norms,
            "missing_grads": missing, "rel_err": rel_err}


if __name__ == "__main__":
    main()
