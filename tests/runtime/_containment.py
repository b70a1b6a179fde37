"""NaN/Inf containment checks shared by the reference, CPU-executor and kernel tests.

The contract (DESIGN.md, semantics): a query is never affected by a key it may not see, not
even by a NaN or Inf stored there; the float64 reference honours it too. ``poison`` writes
NaN/Inf into chosen key rows (k and/or v), query rows (q and/or dout) and whole padding
tokens; ``taint`` derives from the dense mask which outputs may legitimately be non-finite;
``assert_contained`` checks every other output against the reference, element by element.
"""
from __future__ import annotations

import math

import torch

NAN, INF = float("nan"), float("inf")


def poison(q, k, v, dout, *, keys=(), queries=(), padding=()):
    """Copies of q, k, v [B, H|KVH, N, D] and dout with non-finite values written in:

    keys:    (b, kv_head, token) rows, in turn: v all NaN; k[0] = +Inf; k[1] = NaN and
             v[-1] = -Inf; k all -Inf and v all +Inf
    queries: (b, head, token) rows, in turn: q[0] = NaN; dout[-1] = +Inf; q all +Inf and
             dout all NaN
    padding: tokens whose q, k, v and dout are NaN in every batch element and head (garbage
             in padding positions; the pattern must leave them unseen)

    Returns (q, k, v, dout, bad_q, bad_k, bad_do): the bool masks [B, H|KVH, N] of the rows
    that hold a non-finite value."""
    q, k, v, dout = (t.detach().clone() for t in (q, k, v, dout))
    bad_q = torch.zeros(q.shape[:3], dtype=torch.bool)
    bad_do = torch.zeros(q.shape[:3], dtype=torch.bool)
    bad_k = torch.zeros(k.shape[:3], dtype=torch.bool)
    for n, (b, h, t) in enumerate(keys):
        kind = n % 4
        if kind == 0:
            v[b, h, t] = NAN
        elif kind == 1:
            k[b, h, t, 0] = INF
        elif kind == 2:
            k[b, h, t, 1] = NAN
            v[b, h, t, -1] = -INF
        else:
            k[b, h, t] = -INF
            v[b, h, t] = INF
        bad_k[b, h, t] = True
    for n, (b, h, t) in enumerate(queries):
        kind = n % 3
        if kind == 0:
            q[b, h, t, 0] = NAN
        elif kind == 1:
            dout[b, h, t, -1] = INF
        else:
            q[b, h, t] = INF
            dout[b, h, t] = NAN
        bad_q[b, h, t] |= kind != 1
        bad_do[b, h, t] |= kind != 0
    for t in padding:
        for x in (q, k, v, dout):
            x[:, :, t] = NAN
        bad_q[:, :, t] = bad_do[:, :, t] = True
        bad_k[:, :, t] = True
    return q, k, v, dout, bad_q, bad_k, bad_do


def taint(mask, bad_q, bad_k, bad_do):
    """Which outputs may be non-finite, from the pattern's mask [(B,) H, N, N] and the bad
    rows: (rows_fwd [B, H, N]: out and lse; rows_bwd [B, H, N]: dq; keys_bwd [B, KVH, N]: dk, dv).

    A row is tainted by a bad key it sees, or by its own bad q (dout, for the backward) when
    it sees anything; a key's gradients by any tainted row that sees it. Everything else must
    come out exactly as from clean inputs."""
    b, h, n = bad_q.shape
    kvh = bad_k.shape[1]
    group = h // kvh
    mask = mask.expand(b, h, n, n)
    nonempty = mask.any(-1)
    bad_k_h = bad_k.repeat_interleave(group, 1)
    rows_fwd = (mask & bad_k_h[:, :, None, :]).any(-1) | (bad_q & nonempty)
    rows_bwd = rows_fwd | (bad_do & nonempty)
    keys_bwd = (mask & rows_bwd[..., None]).any(-2).view(b, kvh, group, n).any(2)
    return rows_fwd, rows_bwd, keys_bwd


def unseen_keys(mask, b: int, kv_heads: int) -> torch.Tensor:
    """bool [B, KVH, N]: keys no query of their query heads may see (dk = dv = 0 exactly there)."""
    h, n = mask.shape[-3], mask.shape[-1]
    seen = mask.expand(b, h, n, n).any(-2).view(b, kv_heads, h // kv_heads, n).any(2)
    return ~seen


def tolerance(dtype: torch.dtype, length: int) -> float:
    """Element error allowed relative to the largest reference value of a tensor: a few
    rounding errors of ``dtype`` grown like a random walk over ``length`` summed terms."""
    return 4 * torch.finfo(dtype).eps * math.sqrt(max(1, length))


def assert_contained(got: dict, want: dict, clean: dict, dtype, length: int) -> None:
    """For each name: at the ``clean`` positions (bool, broadcast over the last dim) the
    reference is finite, ``got`` is finite, and they agree to ``tolerance(dtype, length)``."""
    tol = tolerance(dtype, length)
    for name, w in want.items():
        g, sel = got[name].detach(), clean[name]
        w = w.detach().double()
        assert g.shape == w.shape, (name, g.shape, w.shape)
        gs, ws = g.double()[sel], w[sel]
        assert sel.any(), f"{name}: nothing left to check"
        empty = torch.isneginf(ws)  # LSE of rows that see nothing
        assert torch.equal(torch.isneginf(gs), empty), f"{name}: -inf on other rows than the reference's"
        gs, ws = gs[~empty], ws[~empty]
        assert torch.isfinite(ws).all(), f"{name}: the reference is not contained"
        bad = ~torch.isfinite(gs)
        assert not bad.any(), f"{name}: {int(bad.sum())} clean value(s) non-finite"
        scale = ws.abs().max().clamp_min(1e-30)
        err = ((gs - ws).abs() / scale).max().item()
        assert err <= tol, f"{name}: error {err:.2e} > {tol:.2e} (relative to max |want|)"


# ------------------------------------------------------------------------------------
# Cases: one per path (static, routed, segments: scattered voxels and grouped tokens)
# ------------------------------------------------------------------------------------
class Case:
    """A pattern on a problem with the run-time inputs of its path, and where to poison.

    Tensors are [B, H, N, D] throughout; a Scattered case (one batch of voxels, the batch id
    in ``coords``) moves them to the voxel layout [N, H, D] around the calls."""

    def __init__(self, pattern, problem, *, batch=1, keys=(), queries=(), padding=(), routes=None, coords=None,
                 groups=None, q_tile=None, k_tile=None):
        self.pattern, self.problem, self.batch = pattern, problem, batch
        self.keys, self.queries, self.padding = keys, queries, padding
        self.inputs = dict(routes=routes, coords=coords, groups=groups)
        self.tiles = dict(q_tile=q_tile, k_tile=k_tile)
        self.voxels = coords is not None

    @property
    def tokens(self) -> int:
        c = self.inputs["coords"]
        return self.problem.tokens if c is None else c.shape[0]

    def mask(self) -> torch.Tensor:
        import sparseforge as sf
        return sf.dense_mask(self.pattern, self.problem, **{k: v for k, v in self.inputs.items() if v is not None})

    def qkv_dout(self, dtype=None, seed=0):
        dtype = self.problem.dtype if dtype is None else dtype
        gen = torch.Generator().manual_seed(seed)
        b, h, kvh, n, d = self.batch, self.problem.heads, self.problem.kv_heads, self.tokens, self.problem.head_dim
        return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
                     for shape in ((b, h, n, d), (b, kvh, n, d), (b, kvh, n, d), (b, h, n, d)))

    def _call(self, fn, q, k, v, **kw):
        if not self.voxels:
            return fn(q, k, v, return_lse=True, **kw)
        out, lse = fn(*(t[0].transpose(0, 1) for t in (q, k, v)), return_lse=True, **kw)
        return out.transpose(0, 1)[None], lse.transpose(0, 1)[None]

    def compiled(self, backend):
        import sparseforge as sf
        attn = sf.compile(self.pattern, self.problem, backend=backend, **self.tiles)
        kw = {k: v for k, v in self.inputs.items() if v is not None}
        return lambda q, k, v: self._call(attn, q, k, v, **kw)

    def reference(self):
        import sparseforge as sf
        kw = {k: v for k, v in self.inputs.items() if v is not None}
        return lambda q, k, v: self._call(
            lambda *t, **a: sf.reference_attention(*(x.double() for x in t), self.pattern, self.problem, **a),
            q, k, v, **kw)

    def poisoned(self, dtype=None, seed=0):
        """(clean (q, k, v, dout), poisoned (q, k, v, dout), taint masks, unseen keys)."""
        clean = self.qkv_dout(dtype, seed)
        q, k, v, dout, bad_q, bad_k, bad_do = poison(*clean, keys=self.keys, queries=self.queries,
                                                     padding=self.padding)
        mask = self.mask()
        return clean, (q, k, v, dout), taint(mask, bad_q, bad_k, bad_do), unseen_keys(mask, self.batch,
                                                                                       self.problem.kv_heads)


def run(fn, q, k, v, dout) -> dict:
    """out, lse and the gradients of (out * dout).sum() of ``fn(q, k, v) -> (out, lse)``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def clean_positions(rows_fwd, rows_bwd, keys_bwd) -> dict:
    return dict(out=~rows_fwd, lse=~rows_fwd, dq=~rows_bwd, dk=~keys_bwd, dv=~keys_bwd)


def make_cases(dtype=torch.float32, head_dim: int = 16) -> dict:
    """Small cases with masked pairs inside visited tiles, so that a kernel or the CPU executor
    meets a poisoned key (or query) in a tile where other rows (keys) are allowed."""
    import sparseforge as sf

    def P(grid=None, heads=1, kv_heads=None):
        return sf.Problem(grid=grid, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)

    gen = torch.Generator().manual_seed(7)
    coords = torch.cat([torch.randint(0, 2, (40, 1), generator=gen), torch.randint(0, 8, (40, 2), generator=gen)], 1)
    groups = torch.tensor([[0] * 6 + [-1] * 3 + [1] * 9 + [0] * 4 + [-1] * 2, [2] * 12 + [3] * 10 + [-1] * 2])
    return {
        "neighborhood_gqa": Case(sf.Neighborhood(3), P((4, 6), heads=2, kv_heads=1), q_tile=(2, 4), k_tile=(2, 4),
                                 keys=[(0, 0, 0), (0, 0, 23)], queries=[(0, 1, 3)]),
        "documents_padding": Case(sf.Documents([5, 20, 3]) & sf.Causal() & sf.Sink(25), P(28), q_tile=(8,), k_tile=(8,),
                                  keys=[(0, 0, 10), (0, 0, 20), (0, 0, 16), (0, 0, 7)], queries=[(0, 0, 22), (0, 0, 2)],
                                  padding=(25, 26, 27)),
        "routed": Case(sf.Routed((2, 4), 2, per_head=True), P((4, 8), heads=2), batch=2,
                       routes=torch.tensor([[[[0, 1], [2, 2], [3, 0], [1, 3]], [[1, 2], [0, 3], [3, 3], [2, 0]]],
                                            [[[3, 2], [1, 0], [0, 0], [2, 1]], [[0, 1], [1, 2], [2, 3], [3, 0]]]]),
                       keys=[(0, 0, 9), (1, 1, 20), (0, 1, 30), (1, 0, 4)], queries=[(0, 0, 17), (1, 1, 2)]),
        "scattered": Case(sf.Scattered((4, 4)), P(heads=2), coords=coords, q_tile=16, k_tile=16,
                          keys=[(0, 0, 5), (0, 1, 12), (0, 0, 30), (0, 1, 21)], queries=[(0, 0, 8), (0, 1, 33)]),
        "grouped": Case(sf.Grouped(), P(24, heads=2), batch=2, groups=groups, q_tile=16, k_tile=16,
                        keys=[(0, 0, 2), (1, 1, 14), (0, 1, 11), (1, 0, 20)], queries=[(0, 1, 4), (1, 0, 13)],
                        padding=(6, 7, 8)),
    }
