"""sparseforge as a transformers attention implementation: ``register()``, then
``attn_implementation="sparseforge"``.

    from sparseforge.integrations import transformers as sf_hf
    sf_hf.register()                                         # or register(patterns={1: sf.StridedShards(...)})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sparseforge")
    model.generate(input_ids, attention_mask=attention_mask)  # prefill and decode on sparseforge ops

``register`` adds two entries under one name through transformers' own registries:

- ``AttentionInterface``: the attention function every layer calls with q [B, H, Nq, D],
  k/v [B, KVH, Nk, D] (GQA kept), ``scaling``, ``dropout``, and the layer's ``sliding_window``,
  ``softcap`` (Gemma2) and ``s_aux`` (gpt-oss's learned sinks). It runs one compiled sparseforge
  attention per (pattern, heads, kv heads, head dim, dtype, modifiers), cached for the process, so
  a ``generate()`` loop compiles nothing after its first step: prefill is self attention
  (Nq = Nk), each decode step a 1-D call with Nq < Nk (the queries are the last Nq positions
  of the keys, sparseforge's decode alignment).
- ``AttentionMaskInterface``: the mask builder transformers calls once per forward and mask
  type (full / sliding, causal / bidirectional). It materialises nothing: it hands the layers a
  ``MaskInfo`` holding the 2-D padding mask cut to the keys (left-padded batches in generation,
  right-padded encoder batches) and transformers' own mask function and offsets.

The pattern of a layer comes from what the layer asks for: ``Causal()`` for a causal layer,
``SlidingWindow(w - 1)`` (``-(w-1) <= k - q <= 0``, transformers' ``kv_idx > q_idx - w``) for
a causal layer with ``sliding_window=w`` (Mistral, Qwen2/3, Gemma2/3 local layers, gpt-oss),
``Full()`` and ``SlidingWindow(w - 1, w - 1)`` for bidirectional layers (ModernBERT global and
local layers: ``|q - k| <= w - 1``). Before a call runs, the pattern is checked against
transformers' mask function on every (query, key) pair of the call that a real query can see
(once per forward and mask type, ``check_masks=True``; a call of more than ``CHECK_PAIRS`` pairs,
a long prefill, on its first and last query rows only, to bound the check's memory); any difference — packed sequences,
chunked attention, image-token overlays, a pattern this module does not derive — raises a
``NotImplementedError`` that names the mask, never a different result. A 4-D tensor mask passed
by the caller is accepted when it is exactly that pattern with a key padding mask (boolean, or
additive with 0 / -inf / the dtype's minimum), else refused the same way.

``register(patterns={layer_index: pattern})`` replaces the derived pattern on those layers with
any sparseforge pattern (e.g. ``StridedShards`` on every other layer), for training and for
generation (decode steps use the decode alignment); the layer's softcap, sinks, scale and the
padding still apply. Padding keeps the tokens' positions in the padded tensor (as transformers'
masks do): with left padding, position-dependent patterns (``Sink``, ``StridedShards``) count
the pad tokens.

Refused, each with an error naming it: attention dropout > 0 (training with
``attention_dropout``), ``output_attentions=True``, ``head_mask``, a ``position_bias``,
``BlockMask`` masks, unrecognised masks, a per-layer pattern on a layer whose cache drops keys
(sliding-window cache layers, ``kv_offset > 0``), and whatever the sparseforge backend refuses
(on CUDA tensors the Triton kernels run prefill and the decode kernel runs decode steps,
Nq < Nk, forward only: training with Nq != Nk runs on the CPU executor).
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping

import torch

from .. import api
from ..dsl.modifiers import Sinks, Softcap
from ..dsl.pattern import Pattern
from ..dsl.problem import Problem
from ..dsl.semantics import dense_mask, make_context, mask_rows
from ..dsl.sequence import Causal, Full
from ..dsl.local import SlidingWindow

__all__ = ["MaskInfo", "NAME", "clear_cache", "compiled_count", "layer_pattern", "register", "unregister"]

#: The name ``register()`` uses by default (``attn_implementation="sparseforge"``).
NAME = "sparseforge"

_LOCK = threading.Lock()
_COMPILED: dict = {}


def clear_cache() -> None:
    """Forget the compiled attentions (they are kept per process, keyed by pattern, heads,
    KV heads, head dim, dtype, modifiers and backend)."""
    with _LOCK:
        _COMPILED.clear()


def compiled_count() -> int:
    """How many attentions have been compiled so far (a ``generate()`` loop adds none after its
    first step)."""
    return len(_COMPILED)


def _compiled(pattern: Pattern, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              softcap: float | None, sinks: torch.dtype | None, backend: str | None, tokens: int):
    """The compiled attention of this key (``sinks``: the sink logits' dtype, None without sinks)."""
    key = (pattern, heads, kv_heads, head_dim, dtype, softcap, sinks, backend)
    with _LOCK:
        attn = _COMPILED.get(key)
        if attn is None:
            mods = _modifiers(softcap, None if sinks is None else torch.zeros(heads, dtype=sinks))
            problem = Problem(grid=max(int(tokens), 1), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                              dtype=dtype)
            attn = api.compile(pattern, problem, backend=backend, modifiers=mods)
            _COMPILED[key] = attn
    return attn


def _modifiers(softcap, sinks) -> tuple:
    mods = []
    if softcap is not None:
        mods.append(Softcap(float(softcap)))
    if sinks is not None:
        mods.append(Sinks(sinks))
    return tuple(mods)


# ------------------------------------------------------------------------------------
# The mask interface: what a layer learns about its mask
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class MaskInfo:
    """What the ``"sparseforge"`` mask interface hands the layers of one forward (one per mask
    type): no dense mask, only

    padding:   bool [B, kv_length] real keys (the 2-D ``attention_mask`` cut to this call's keys,
               positions ``kv_offset ...``), or None where every key is real;
    q_length, kv_length, q_offset, kv_offset: the sizes and absolute positions transformers
               gives the call's queries and keys (``cache.get_mask_sizes``);
    mask_function: transformers' mask function (without padding), evaluated only to check
               a layer's pattern (``use_vmap`` as transformers builds it).
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: Callable
    padding: torch.Tensor | None
    use_vmap: bool = False
    local_size: int | None = None
    checked: set = dataclasses.field(default_factory=set)

    @property
    def ndim(self) -> int:  # transformers' code asks a mask for its rank in places
        return 4

    @property
    def shape(self) -> tuple:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def describe(self) -> str:
        fn = getattr(self.mask_function, "__qualname__", type(self.mask_function).__name__)
        return f"transformers mask function {fn} (queries at {self.q_offset}.., keys at {self.kv_offset}..)"


def _mask_interface(batch_size: int, q_length: int = None, kv_length: int = None, q_offset=0, kv_offset=0,
                    mask_function: Callable = None, attention_mask: torch.Tensor | None = None,
                    local_size: int | None = None, use_vmap: bool = False, cache_position=None, **kwargs) -> MaskInfo:
    """``AttentionMaskInterface`` entry of the ``"sparseforge"`` name (transformers >= 5 keywords)."""
    if q_length is None:
        raise NotImplementedError("sparseforge's transformers integration needs transformers >= 5 (its mask "
                                  "interface passes q_length/q_offset); found an older calling convention")
    q_offset = int(q_offset)
    kv_offset = int(kv_offset)
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError(f"a {attention_mask.dim()}-D attention_mask reached the mask interface; "
                                      "sparseforge takes a 2-D padding mask [B, N] there")
        pm = attention_mask.to(torch.bool)
        end = kv_offset + kv_length
        if pm.shape[-1] < end:  # as transformers: positions past the 2-D mask are padding
            pm = torch.nn.functional.pad(pm, (0, end - pm.shape[-1]), value=False)
        pm = pm[:, kv_offset:end]
        padding = None if bool(pm.all()) else pm.contiguous()
    return MaskInfo(batch_size=int(batch_size), q_length=int(q_length), kv_length=int(kv_length),
                    q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function, padding=padding,
                    use_vmap=bool(use_vmap), local_size=local_size)


# ------------------------------------------------------------------------------------
# Patterns
# ------------------------------------------------------------------------------------
def layer_pattern(causal: bool, sliding_window: int | None) -> Pattern:
    """The sparseforge pattern of a transformers layer: ``Causal()``, ``SlidingWindow(w - 1)``
    (causal window of w keys, the query included), ``Full()`` or ``SlidingWindow(w - 1, w - 1)``
    (bidirectional, ``|q - k| <= w - 1``; ModernBERT passes ``w = config.sliding_window + 1``)."""
    if sliding_window is not None:
        w = int(sliding_window)
        if w < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window!r}")
        return SlidingWindow(w - 1) if causal else SlidingWindow(w - 1, w - 1)
    return Causal() if causal else Full()


#: The most (query, key) pairs a mask check compares: beyond it, the first and last query rows
#: (where windows, sinks and padding meet the borders) are checked, not every row.
CHECK_PAIRS = 1 << 24


def _check_rows(nq: int, nk: int) -> torch.Tensor | None:
    """The query rows a mask check compares: None (all) when nq x nk fits ``CHECK_PAIRS``, else
    the first and the last ``CHECK_PAIRS // (2 nk)`` rows."""
    if nq * nk <= CHECK_PAIRS:
        return None
    r = max(1, min(nq // 2, CHECK_PAIRS // (2 * nk)))
    return torch.cat([torch.arange(r), torch.arange(nq - r, nq)])


def _sf_mask(pattern: Pattern, heads: int, kv_heads: int, head_dim: int, dtype, nq: int, nk: int,
             rows: torch.Tensor | None = None) -> torch.Tensor:
    """bool [H, len(rows), nk]: ``pattern`` with the queries the last nq of the nk keys, at query
    rows ``rows`` (None: all)."""
    if nq == nk:
        problem = Problem(grid=nk, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    else:
        problem = Problem(grid=nq, kv_grid=nk, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    if rows is not None:
        return mask_rows(pattern, make_context(pattern, problem), rows)[0]
    m = dense_mask(pattern, problem)
    return m if m.dim() == 3 else m.reshape(-1, nq, nk)


def _first_difference(ours, theirs, rows_real, padding) -> str:
    """Where ``ours`` and ``theirs`` ([B, H|1, Nq, Nk]) differ on a real row and a real key."""
    diff = ours ^ theirs
    if padding is not None:
        diff = diff & padding[:, None, None, :]
    diff = diff & rows_real[:, None, :, None]
    b, h, i, j = (int(x) for x in diff.nonzero()[0])
    return f"sample {b}, query {i}, key {j}: transformers {'allows' if bool(theirs[b, min(h, theirs.shape[1] - 1), i, j]) else 'masks'} it"


def _check_against(pattern: Pattern, theirs: torch.Tensor, padding, what: str, *, heads, kv_heads, head_dim,
                   dtype, nq: int, nk: int, rows: torch.Tensor | None = None) -> None:
    """Raise unless ``theirs`` (bool [B, 1|H, len(rows), nk], the model's mask without padding at
    query rows ``rows``, None: all nq) equals ``pattern`` (queries the last nq of the first
    ``nk`` keys) on every real query row and real key; keys past ``nk`` (a static cache's empty
    slots) must be masked."""
    b = theirs.shape[0]
    full_nk = theirs.shape[-1]
    n_rows = nq if rows is None else len(rows)
    ours = torch.zeros(heads, n_rows, full_nk, dtype=torch.bool)
    ours[..., :nk] = _sf_mask(pattern, heads, kv_heads, head_dim, dtype, nq, nk, rows)
    ours = ours.to(theirs.device)[None]
    if padding is None:
        rows_real = torch.ones(b, n_rows, dtype=torch.bool, device=theirs.device)
    else:
        rows_real = padding[:, nk - nq:nk] if rows is None else padding[:, nk - nq + rows.to(padding.device)]
    eq_rows = ((ours == theirs) | ~padding[:, None, None, :]) if padding is not None else (ours == theirs)
    ok = eq_rows.all(-1) | ~rows_real[:, None, :]
    if not bool(ok.all()):
        where = _first_difference(ours.expand(b, -1, -1, -1), theirs.expand(b, ours.shape[1], -1, -1), rows_real,
                                  padding)
        raise NotImplementedError(
            f"sparseforge: the attention mask of this call ({what}) is not {pattern!r} (with the queries the last "
            f"{nq} of {nk} keys) plus key padding; first difference at {where}. Unrecognised masks (packed "
            "sequences, chunked attention, token-type/image overlays, custom mask functions) are not supported: "
            "use another attn_implementation, or register(patterns={layer: pattern}) to choose the pattern")


def _check_mask_info(info: MaskInfo, pattern: Pattern, *, heads, kv_heads, head_dim, dtype, nq, nk) -> None:
    key = (pattern, heads, nq, nk)
    if key in info.checked:
        return
    from transformers.masking_utils import sdpa_mask

    device = info.padding.device if info.padding is not None else "cpu"
    rows = _check_rows(info.q_length, info.kv_length)

    def theirs_at(first: int, count: int):
        return sdpa_mask(batch_size=info.batch_size, q_length=count, kv_length=info.kv_length,
                         q_offset=info.q_offset + first, kv_offset=info.kv_offset, mask_function=info.mask_function,
                         attention_mask=None, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                         use_vmap=info.use_vmap, device=device).to(torch.bool)
    if rows is None:
        theirs = theirs_at(0, info.q_length)
    else:   # the first and the last rows (a long prefill: a bounded check)
        half = len(rows) // 2
        theirs = torch.cat([theirs_at(0, half), theirs_at(info.q_length - half, half)], dim=2)
    _check_against(pattern, theirs, info.padding, info.describe(), heads=heads, kv_heads=kv_heads,
                   head_dim=head_dim, dtype=dtype, nq=nq, nk=nk, rows=rows)
    info.checked.add(key)


def _tensor_mask(mask: torch.Tensor, pattern: Pattern, *, heads, kv_heads, head_dim, dtype, nq, nk):
    """A caller's 4-D mask [B, 1|H, nq, >=nk] recognised as ``pattern`` plus key padding: returns
    the key padding mask bool [B, nk] (None: all real), else raises naming the mask."""
    if mask.dim() != 4 or mask.shape[-2] != nq or mask.shape[-1] < nk:
        raise NotImplementedError(f"sparseforge: an attention_mask of shape {list(mask.shape)} is not recognised "
                                  f"(expected [B, 1, {nq}, {nk}] for {nq} queries and {nk} keys)")
    mask = mask[..., :nk]
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        neg = torch.isneginf(mask) | (mask <= torch.finfo(mask.dtype).min / 2)
        if not bool(((mask == 0) | neg).all()):
            raise NotImplementedError("sparseforge: a 4-D attention_mask with additive bias values (other than 0 "
                                      "and -inf / the dtype's minimum) is not supported; give a boolean mask or a "
                                      "2-D padding mask")
        allowed = mask == 0
    # a key nobody may see is padding; a query whose own key is padding is a padded row
    padding = allowed.any(dim=(1, 2))
    _check_against(pattern, allowed, padding, f"a 4-D {mask.dtype} attention_mask", heads=heads, kv_heads=kv_heads,
                   head_dim=head_dim, dtype=dtype, nq=nq, nk=nk)
    return None if bool(padding.all()) else padding


# ------------------------------------------------------------------------------------
# The attention function
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Options:
    patterns: Mapping[int, Pattern]
    backend: str | None
    check_masks: bool


def _refuse_extras(module, dropout, kwargs) -> None:
    if dropout is not None and float(dropout) > 0.0:
        raise NotImplementedError(
            f"sparseforge attention has no attention dropout (dropout={dropout} in training, from the config's "
            "attention_dropout); set config.attention_dropout = 0.0 or call model.eval()")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("sparseforge attention does not return attention weights "
                                  "(output_attentions=True); use attn_implementation='eager' for them")
    for name in ("head_mask", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"sparseforge attention does not take {name} (a T5-style additive bias / a "
                                      "per-head mask); use another attn_implementation for this model")


def _attention(options: _Options, module, query, key, value, attention_mask, dropout: float = 0.0,
               scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    _refuse_extras(module, dropout, kwargs)
    if not (query.dim() == key.dim() == value.dim() == 4):
        raise ValueError(f"sparseforge attention takes q [B, H, Nq, D] and k/v [B, KVH, Nk, D], got "
                         f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    b, heads, nq, d = query.shape
    kv_heads, nk = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    sliding_window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    layer = getattr(module, "layer_idx", None)
    override = None
    if options.patterns:
        if layer is None:
            raise ValueError(f"register(patterns=...) names layers by index, but {type(module).__name__} has no "
                             "layer_idx")
        override = options.patterns.get(int(layer))
    pattern = override if override is not None else layer_pattern(bool(causal), sliding_window)
    shape = dict(heads=heads, kv_heads=kv_heads, head_dim=d, dtype=query.dtype)

    padding = None
    if isinstance(attention_mask, MaskInfo):
        info = attention_mask
        if info.batch_size != b or info.q_length != nq or info.kv_length != nk:
            raise NotImplementedError(
                f"sparseforge: the mask was built for {info.batch_size} samples, {info.q_length} queries and "
                f"{info.kv_length} keys, but this layer has {b}, {nq} and {nk} (a cache layer of another size?)")
        end = info.q_offset + nq - info.kv_offset  # keys past the last query: a static cache's empty slots
        if not 0 < end <= nk or end < nq:
            raise NotImplementedError(f"sparseforge: queries at positions {info.q_offset}..{info.q_offset + nq - 1} "
                                      f"and keys at {info.kv_offset}..{info.kv_offset + nk - 1} are not the last "
                                      "queries of the keys' sequence (decode alignment)")
        if override is not None and info.kv_offset != 0:
            raise NotImplementedError(
                f"sparseforge: layer {layer} has the pattern {override!r} from register(patterns=...), but its cache "
                f"holds only keys from position {info.kv_offset} on (a sliding-window cache layer); positions of "
                "such a pattern need the whole sequence: use a full (non-sliding) cache")
        if override is None and options.check_masks:
            _check_mask_info(info, pattern, nq=nq, nk=end, **shape)
        padding = info.padding
        if end < nk:
            key, value = key[:, :, :end], value[:, :, :end]
            padding = None if padding is None else padding[:, :end]
            nk = end
    elif isinstance(attention_mask, torch.Tensor):
        if override is not None:
            raise NotImplementedError(f"sparseforge: layer {layer} has the pattern {override!r} from "
                                      "register(patterns=...), which a caller's 4-D attention_mask cannot be "
                                      "combined with; pass a 2-D padding mask")
        padding = _tensor_mask(attention_mask, pattern, nq=nq, nk=nk, **shape)
    elif attention_mask is not None:
        raise NotImplementedError(f"sparseforge: an attention_mask of type {type(attention_mask).__name__} is not "
                                  "supported (a BlockMask is flex_attention's); use attn_implementation='sparseforge' "
                                  "for the whole model so its masks are built for it")
    if padding is not None:
        padding = padding.to(query.device)
        if bool(padding.all()):
            padding = None

    attn = _compiled(pattern, heads, kv_heads, d, query.dtype, None if softcap is None else float(softcap),
                     None if sinks is None else sinks.dtype, options.backend, nq)
    mods = _modifiers(softcap, sinks)
    out = attn(query, key, value, scale=scaling, modifiers=mods or None, key_padding_mask=padding)
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------
def register(patterns: Mapping[int, Pattern] | None = None, backend: str | None = None, *, name: str = NAME,
             check_masks: bool = True) -> str:
    """Register sparseforge attention with transformers under ``name`` (default ``"sparseforge"``):
    an ``AttentionInterface`` function and the matching ``AttentionMaskInterface`` entry. Returns
    ``name``; use it as ``attn_implementation=name`` or ``model.set_attn_implementation(name)``.

    patterns:    ``{layer_index: pattern}``: those layers attend with that sparseforge pattern
                 instead of the one their mask describes (training and generation);
    backend:     ``sf.compile``'s backend (None: Triton kernels on CUDA tensors, the CPU executor
                 on CPU tensors; "cpu", "triton", "interpret");
    check_masks: check each call's pattern against transformers' mask function (once per forward
                 and mask type, O(B * Nq * Nk) booleans like the sdpa path's mask); False trusts
                 the derivation from the layer's ``is_causal`` and ``sliding_window``.
    Registering the same name again replaces its options (a name's options apply to every model
    using it; give models with different per-layer patterns different names)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("sparseforge.integrations.transformers needs transformers >= 5 "
                          "(pip install 'sparseforge[models]')") from e
    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") or \
            name.startswith("flash_attention") or "|" in name:
        raise ValueError(f"name must be a new attention implementation name, got {name!r}")
    checked = {}
    for layer, pattern in dict(patterns or {}).items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"patterns keys must be layer indices (ints >= 0), got {layer!r}")
        if not isinstance(pattern, Pattern):
            raise TypeError(f"patterns[{layer}] must be a sparseforge Pattern, got {type(pattern).__name__}")
        if not pattern.is_static:
            raise ValueError(f"patterns[{layer}] = {pattern!r} depends on run-time content; per-layer patterns "
                             "must be static (known from positions alone)")
        checked[layer] = pattern
    if backend is not None:
        from ..runtime.inputs import check_backend
        check_backend(backend)
    options = _Options(patterns=checked, backend=backend, check_masks=bool(check_masks))

    def sparseforge_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
        return _attention(options, module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                          is_causal=is_causal, **kwargs)

    sparseforge_attention_forward.sparseforge_options = options
    AttentionInterface.register(name, sparseforge_attention_forward)
    AttentionMaskInterface.register(name, _mask_interface)
    return name


def unregister(name: str = NAME) -> None:
    """Remove ``name`` from transformers' attention and mask registries (models already using it
    then fail to find it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
