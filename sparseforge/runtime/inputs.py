"""Input checks of the runtime, in one place: options at compile time, tensors at call time.
Every error names the argument, the value and what was expected."""
from __future__ import annotations

import math
import numbers

import torch

from ..dsl.problem import DTYPE_NAMES, Problem
from ..dsl.semantics import check_int_tensor, check_key_padding_mask, check_qkv
from ..codegen.config import KernelConfig
from .ops import resolve_backend

__all__ = ["BACKENDS", "PADDING_ARGUMENTS", "TRITON_DTYPES", "TRITON_HEAD_DIMS", "check_backend", "check_call_grid",
           "check_call_kv_grid",
           "check_call_modifiers", "check_call_scale", "check_compile_modifiers", "check_kernel_options", "check_qkv",
           "check_return_lse", "check_scale", "check_triton_problem", "check_voxel_qkv", "op_backend",
           "padding_input"]

#: Values of ``compile(..., backend=)``.
BACKENDS = (None, "triton", "cpu", "interpret")
#: Head dims the generated Triton kernels support.
TRITON_HEAD_DIMS = (16, 32, 64, 96, 128, 256)
#: Input dtypes the generated Triton kernels support.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def check_triton_problem(problem: Problem, backend: str) -> None:
    """Refuse problems the generated kernels (or the Triton interpreter) cannot run right."""
    if backend == "interpret" and problem.dtype == torch.bfloat16:
        # Triton 3.9's interpreter keeps bf16 as uint16 and tl.dot multiplies the raw bit
        # patterns (triton-lang/triton#11584): the results would be silently wrong.
        raise ValueError("dtype=bf16 cannot run under backend='interpret': the Triton interpreter's tl.dot "
                         "multiplies bfloat16 bit patterns (triton-lang/triton#11584); use fp16/fp32 there, "
                         "backend='cpu', or a GPU")
    if problem.head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(f"head_dim={problem.head_dim} is not supported by backend={backend!r}; "
                         f"supported head dims: {list(TRITON_HEAD_DIMS)} (backend='cpu' takes any)")
    if problem.dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype={problem.dtype} is not supported by backend={backend!r}; supported: "
                         f"{[DTYPE_NAMES[d] for d in TRITON_DTYPES]} (backend='cpu' takes float64 too)")


def check_kernel_options(problem: Problem, backend, config, q_tile, k_tile) -> None:
    """The checks every kernel-backed compile shares: the problem against the backend, and
    config vs q_tile/k_tile."""
    if backend in ("triton", "interpret"):
        check_triton_problem(problem, backend)
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a sparseforge KernelConfig, got {config!r}")
    if config is not None and (q_tile is not None or k_tile is not None):
        raise ValueError("give either config or q_tile/k_tile, not both (the config holds the tiles)")


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale of a call: ``scale``, or head_dim ** -0.5 when None."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    return float(scale)


def check_return_lse(return_lse) -> None:
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")


def op_backend(problem: Problem, backend: str | None, q: torch.Tensor) -> str:
    """Check q's device/dtype against the compile-time ``backend``; the backend string the
    ops receive."""
    dev = q.device
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"q is on device {dev}; sparseforge runs on 'cuda' and 'cpu' tensors")
    which = resolve_backend("auto" if backend is None else backend, dev)
    if which == "cpu":
        allowed = (problem.dtype, torch.float64)
    else:
        check_triton_problem(problem, which)
        allowed = (problem.dtype,)
    if q.dtype not in allowed:
        extra = " (or float64 on the CPU path)" if which == "cpu" else ""
        raise TypeError(f"q has dtype {q.dtype}, expected {problem.dtype}{extra}, the dtype of {problem!r}")
    return "auto" if backend is None else backend


def check_call_grid(problem: Problem, grid, q: torch.Tensor) -> tuple:
    """The token grid of a call on q [B, H, N, D]: ``grid`` when given (its product must be
    N), else the problem's grid when it has N tokens, else (N,) for a 1-D problem. Works on
    symbolic sizes (``torch.compile(dynamic=True)``)."""
    ndim = len(problem.grid)
    tokens = q.shape[2]
    if grid is None:
        if ndim == 1:  # q's length, compared with nothing: no guard on it under torch.compile
            return (tokens,)
        if tokens == problem.tokens:
            return problem.grid
        raise ValueError(f"q has shape {tuple(q.shape)}: its {tokens} tokens are not the compiled grid={problem.grid}; "
                         f"pass grid= (a tuple of {ndim} sizes) for a grid of another size")
    if isinstance(grid, (int, torch.SymInt)):
        grid = (grid,)
    grid = tuple(grid)
    if len(grid) != ndim or not all(isinstance(g, (int, torch.SymInt)) and not isinstance(g, bool) for g in grid):
        raise ValueError(f"grid must be a tuple of {ndim} ints (the compiled grid is {problem.grid}), got {grid!r}")
    if math.prod(grid) != tokens:
        raise ValueError(f"grid={grid} has {math.prod(grid)} tokens but q has shape {tuple(q.shape)} ({tokens} tokens)")
    return grid


def check_call_kv_grid(problem: Problem, grid: tuple, kv_grid, k: torch.Tensor) -> tuple | None:
    """The keys' grid of a call on k [B, KVH, Nk, D] whose queries are on ``grid``: ``kv_grid``
    when given (its product must be Nk; 1 to 3 dimensions), else for a 1-D problem (Nk,) from
    k's length (decode: it grows every call, nothing is compared, so nothing is specialised
    under ``torch.compile``), else the problem's key grid when k has that many tokens. None:
    the keys share the queries' grid (a problem without ``kv_grid`` whose k has q's length)."""
    nk = k.shape[2]
    if kv_grid is not None:
        if isinstance(kv_grid, (int, torch.SymInt)):
            kv_grid = (kv_grid,)
        kv_grid = tuple(kv_grid) if isinstance(kv_grid, (tuple, list)) else kv_grid
        if not isinstance(kv_grid, tuple) or not 1 <= len(kv_grid) <= 3 or not all(
                isinstance(g, (int, torch.SymInt)) and not isinstance(g, bool) for g in kv_grid):
            raise ValueError(f"kv_grid must be a tuple of 1 to 3 ints (the keys' grid), got {kv_grid!r}")
        if math.prod(kv_grid) != nk:
            raise ValueError(f"kv_grid={kv_grid} has {math.prod(kv_grid)} tokens but k has shape {tuple(k.shape)} "
                             f"({nk} tokens)")
        return kv_grid
    key_grid = problem.key_grid
    if len(key_grid) == 1 and len(grid) == 1:
        if problem.is_cross:
            return (nk,)
        return None if nk == grid[0] else (nk,)
    if problem.is_cross:
        if nk == math.prod(key_grid):
            return key_grid
        raise ValueError(f"k has shape {tuple(k.shape)}: its {nk} tokens are not the compiled kv_grid={key_grid}; "
                         f"pass kv_grid= (the keys' grid) for keys of another size")
    if nk == math.prod(grid):
        return None
    raise ValueError(f"k has shape {tuple(k.shape)}: its {nk} tokens are not the {math.prod(grid)} of the query grid "
                     f"{tuple(grid)}; pass kv_grid= (the keys' grid) for keys on a grid of their own")


def check_voxel_qkv(q, k, v, problem: Problem, n_voxels: int) -> None:
    """Check q [N, H, D], k/v [N, kv_heads, D] (voxel layout) against ``problem`` and the N
    voxels of the coordinates; errors name the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [N_voxels, H, D] (voxel layout), got {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t, heads in (("q", q, problem.heads), ("k", k, problem.kv_heads), ("v", v, problem.kv_heads)):
        expected = (n_voxels, heads, problem.head_dim)
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected} [N_voxels (rows of coords), "
                             f"{'H' if name == 'q' else 'kv_heads'}, D] for {problem!r}")


# ------------------------------------------------------------------------------------
# Score modifiers and padding of a call (compiled attention)
# ------------------------------------------------------------------------------------
#: The padding arguments of a call, in the order errors list them.
PADDING_ARGUMENTS = ("key_padding_mask", "lengths", "sizes")


def check_compile_modifiers(modifiers, head_scale, pattern, problem):
    """``compile(..., modifiers=, head_scale=)``: the checked ``Modifiers`` (None when there are
    none) and the bool ``head_scale``."""
    from ..dsl.modifiers import check_modifiers

    if not isinstance(head_scale, bool):
        raise TypeError(f"head_scale must be a bool (whether calls pass scale= as a [heads] tensor), got "
                        f"{head_scale!r} ({type(head_scale).__name__})")
    mods = check_modifiers(() if modifiers is None else modifiers, pattern, problem)
    return mods if mods else None


def check_call_modifiers(modifiers, compiled, pattern, problem, device):
    """The checked ``Modifiers`` of a call (None when none), which must have the compiled
    spec (kinds in order, tensor shapes and dtypes, softcap): a ValueError naming
    ``modifiers`` otherwise."""
    from ..dsl.modifiers import check_modifiers, modifier_spec

    mods = check_modifiers(() if modifiers is None else modifiers, pattern, problem, device=device)
    got, want = modifier_spec(mods, False), modifier_spec(compiled, False)
    if got != want:
        if not want:
            raise ValueError(f"modifiers={modifiers!r} given, but this attention was compiled without modifiers; "
                             "compile with sparseforge.compile(..., modifiers=(...)) to use them")
        raise ValueError(f"modifiers={modifiers!r} do not match the compiled ones: expected the spec {want} "
                         f"(kinds in this order, tensor shapes and dtypes, softcap value), got {got}")
    return mods if mods else None


def check_call_scale(scale, head_scale: bool, problem: Problem, device):
    """A call's ``scale``: a float (``head_dim ** -0.5`` when None) or, for an attention compiled
    with ``head_scale=True``, a floating [heads] tensor on q's device."""
    from ..dsl.modifiers import check_scale as check_scale_value

    if isinstance(scale, torch.Tensor):
        if not head_scale:
            raise ValueError(f"scale is a tensor of shape {list(scale.shape)}, but this attention was compiled "
                             "with head_scale=False; compile with head_scale=True for a per-head scale, or pass "
                             "a float")
        return check_scale_value(scale, problem, device=device)
    if head_scale:
        raise ValueError(f"scale must be a [heads={problem.heads}] tensor (this attention was compiled with "
                         f"head_scale=True), got {scale!r}")
    return check_scale(scale, problem.head_dim)


def padding_input(pattern, problem: Problem, grid: tuple, q: torch.Tensor, modifiers, *, key_padding_mask=None,
                  lengths=None, padding_side: str = "right", sizes=None, routes=None, grid_free: bool = False,
                  routed: bool = False):
    """The ops' ``padding`` of a call: None, the key padding mask (bool [B, N]) or per-sample
    boxes (int64 [B, 2, ndim]: first token and extent per dimension) from ``lengths``
    (1-D, right or left padded) or ``sizes`` (leading boxes of the grid).

    Shapes, dtypes and devices are checked always; values (ranges, each sample's grid against
    the pattern and the modifiers) only outside ``torch.compile`` tracing, where they are
    known (the op checks the boxes again)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    given = [name for name, value in zip(PADDING_ARGUMENTS, (key_padding_mask, lengths, sizes)) if value is not None]
    if padding_side != "right" and lengths is None:
        raise ValueError(f"padding_side={padding_side!r} applies to lengths=, which was not given")
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"give at most one of key_padding_mask, lengths and sizes, got {' and '.join(given)}")
    if grid_free:
        raise ValueError(f"{given[0]} needs a token grid, but {pattern!r} takes its tokens from coords "
                         "(voxel patterns have no padding: leave the padded voxels out)")
    b, n = q.shape[0], q.shape[2]
    if key_padding_mask is not None:
        if routed and routes is None:
            raise ValueError(f"key_padding_mask with {pattern!r}: its routing reads every token's q and k, "
                             "padding included; give routes= (routing that ignores padding)")
        return check_key_padding_mask(key_padding_mask, b, n, q.device).contiguous()
    if routed:
        raise NotImplementedError(f"{given[0]}= with {pattern!r}: per-sample routing (each sample routed on its own "
                                  "grid) is not in the compiled attention yet; use key_padding_mask= with routes=, "
                                  "or sparseforge.reference_attention")
    check = not torch.compiler.is_compiling()
    if lengths is not None:
        if len(grid) != 1:
            raise ValueError(f"lengths applies to 1-D sequences, but the problem grid is {problem.grid}; give sizes= "
                             f"([B, {len(grid)}] per-sample grids) or key_padding_mask=")
        t = check_int_tensor("lengths", lengths, (b,), f"[B={b}]", q.device, q.device)
        if check:
            for i, value in enumerate(t.tolist()):
                if not 0 <= value <= n:
                    raise ValueError(f"lengths[{i}] must be in [0, {n}] (the sequence length), got {value}")
                _check_sample(pattern, problem, modifiers, (value,), f"lengths[{i}]={value}")
        start = torch.zeros_like(t) if padding_side == "right" else n - t
        return torch.stack([start, t], dim=1)[:, :, None].contiguous()
    t = check_int_tensor("sizes", sizes, (b, len(grid)), f"[B={b}, ndim={len(grid)}]", q.device, q.device)
    if check:
        for i, box in enumerate(t.tolist()):
            for d, (s, g) in enumerate(zip(box, grid)):
                if not 0 <= s <= g:
                    raise ValueError(f"sizes[{i}][{d}] must be in [0, {g}] (the grid extent), got {s} "
                                     f"(sizes[{i}]={box}, grid={tuple(grid)})")
            _check_sample(pattern, problem, modifiers, tuple(box), f"sizes[{i}]={box}")
    return torch.stack([torch.zeros_like(t), t], dim=1).contiguous()


def _check_sample(pattern, problem: Problem, modifiers, grid: tuple, name: str) -> None:
    """A sample's own grid against the pattern and the modifiers (as the reference checks it)."""
    if math.prod(grid) == 0:
        return
    from ..dsl.modifiers import check_modifiers

    sub = problem.with_grid(grid)
    try:
        pattern.check(sub)
        if modifiers:
            check_modifiers([m for m in (*modifiers.biases, modifiers.softcap, modifiers.sinks) if m is not None],
                            pattern, sub)
    except ValueError as e:
        raise ValueError(f"{name}: the sample is a grid of {grid}, on which {e}") from None
