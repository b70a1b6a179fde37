"""Bad input: every error has the right type and a message that names the argument."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf

F64 = torch.float64


def P(**kw):
    kw.setdefault("head_dim", 4)
    return sf.Problem(**kw)


# ------------------------------------------------------------------------------------
# constructors (no problem needed)
# ------------------------------------------------------------------------------------
CONSTRUCTOR_ERRORS = [
    # (callable, exception, regex the message must match)
    (lambda: sf.Neighborhood(0), ValueError, r"kernel_size must be >= 1, got 0"),
    (lambda: sf.Neighborhood(-3), ValueError, r"kernel_size must be >= 1, got -3"),
    (lambda: sf.Neighborhood((3, 0)), ValueError, r"kernel_size\[1\] must be >= 1, got 0"),
    (lambda: sf.Neighborhood(()), ValueError, r"kernel_size must be an int or a non-empty tuple"),
    (lambda: sf.Neighborhood(3.0), TypeError, r"kernel_size must be an int, got 3\.0"),
    (lambda: sf.Neighborhood("3"), TypeError, r"kernel_size must be an int"),
    (lambda: sf.Neighborhood(True), TypeError, r"kernel_size must be an int, got True"),
    (lambda: sf.Neighborhood(3, dilation=0), ValueError, r"dilation must be >= 1, got 0"),
    (lambda: sf.Neighborhood(3, stride=0), ValueError, r"stride must be >= 1, got 0"),
    (lambda: sf.Neighborhood(3, stride=4), ValueError, r"stride must be <= kernel_size, got stride=4, kernel_size=3"),
    (lambda: sf.Neighborhood((3, 5), stride=(4, 1)), ValueError,
     r"stride must be <= kernel_size in dimension 0, got stride=\(4, 1\)"),
    (lambda: sf.Neighborhood((3, 5), stride=(1, 6)), ValueError, r"stride must be <= kernel_size in dimension 1"),
    (lambda: sf.Neighborhood(3, stride=(1, 5)), ValueError, r"stride must be <= kernel_size in dimension 1"),
    (lambda: sf.Neighborhood((3, 3), stride=(1, 1, 1)), ValueError,
     r"stride=\(1, 1, 1\) and kernel_size=\(3, 3\) must have the same number of entries"),
    (lambda: sf.Neighborhood(3, causal=1), TypeError, r"causal must be a bool"),
    (lambda: sf.Neighborhood(3, causal=(True, 1)), TypeError, r"causal must be a bool or a non-empty tuple of bools"),
    (lambda: sf.Neighborhood(3, causal=()), TypeError, r"causal must be a bool or a non-empty tuple"),
    (lambda: sf.SlidingWindow(-1), ValueError, r"left must be >= 0, got -1"),
    (lambda: sf.SlidingWindow(1, -2), ValueError, r"right must be >= 0, got -2"),
    (lambda: sf.SlidingWindow((1, -1)), ValueError, r"left\[1\] must be >= 0, got -1"),
    (lambda: sf.Halo(0, 1), ValueError, r"block_size must be >= 1, got 0"),
    (lambda: sf.Halo(2, -1), ValueError, r"halo must be >= 0, got -1"),
    (lambda: sf.Blocks(0), ValueError, r"size must be >= 1, got 0"),
    (lambda: sf.Blocks((2, -1)), ValueError, r"size\[1\] must be >= 1, got -1"),
    (lambda: sf.Grid(0), ValueError, r"size must be >= 1, got 0"),
    (lambda: sf.Sink(0), ValueError, r"n must be >= 1, got 0"),
    (lambda: sf.Sink(-2), ValueError, r"n must be >= 1, got -2"),
    (lambda: sf.GlobalTokens([]), TypeError, r"indices must be a non-empty list"),
    (lambda: sf.GlobalTokens(3), TypeError, r"indices must be a non-empty list of token indices, got 3"),
    (lambda: sf.GlobalTokens([-1]), ValueError, r"indices\[0\] must be >= 0, got -1"),
    (lambda: sf.GlobalTokens([2, 1, 2]), ValueError, r"indices must not repeat a token"),
    (lambda: sf.Documents([]), TypeError, r"lengths must be a non-empty list"),
    (lambda: sf.Documents(5), TypeError, r"lengths must be a non-empty list of document lengths, got 5"),
    (lambda: sf.Documents([3, 0]), ValueError, r"lengths\[1\] must be >= 1, got 0"),
    (lambda: sf.StridedShards(0, 1, 2), ValueError, r"block_size must be >= 1, got 0"),
    (lambda: sf.StridedShards(2, 0, 2), ValueError, r"local_blocks must be >= 1, got 0"),
    (lambda: sf.StridedShards(2, (1, 2, 3), 2, causal=False), ValueError,
     r"local_blocks must be an int or a \(left, right\) pair, got \(1, 2, 3\)"),
    (lambda: sf.StridedShards(2, (0, 2), 2, causal=False), ValueError, r"local_blocks\[0\] must be >= 1, got 0"),
    (lambda: sf.StridedShards(2, 1, 0), ValueError, r"vertical_stride must be >= 1, got 0"),
    (lambda: sf.StridedShards(2, 1, 2, dense_heads=-1), ValueError, r"dense_heads must be >= 0, got -1"),
    (lambda: sf.StridedShards(2, 1, 2, heterogeneous=1), TypeError, r"heterogeneous must be a bool, got 1"),
    (lambda: sf.StridedShards(2, 1, 2, causal="yes"), TypeError, r"causal must be a bool"),
    (lambda: sf.Routed(0, 1), ValueError, r"region_size must be >= 1, got 0"),
    (lambda: sf.Routed((2, 0), 1), ValueError, r"region_size\[1\] must be >= 1, got 0"),
    (lambda: sf.Routed(2, 0), ValueError, r"topk must be >= 1, got 0"),
    (lambda: sf.Routed(2, 1, per_head=1), TypeError, r"per_head must be a bool, got 1"),
    (lambda: sf.Scattered(0), ValueError, r"window_size must be >= 1, got 0"),
    (lambda: sf.Scattered(2, shift=-1), ValueError, r"shift must be >= 0, got -1"),
    (lambda: sf.PerHead(sf.Full()), TypeError, r"PerHead takes a list of patterns"),
    (lambda: sf.PerHead([]), ValueError, r"PerHead needs at least one pattern"),
    (lambda: sf.PerHead([sf.Full(), 3]), TypeError, r"PerHead patterns\[1\] must be a pattern, got 3"),
    (lambda: sf.Causal() | 3, TypeError, r"'\|' combines two patterns, got 3"),
    (lambda: sf.Causal() & "Full()", TypeError, r"'&' combines two patterns"),
    (lambda: bool(sf.Causal()), TypeError, r"truth value of a pattern is undefined \(Causal\(\)\)"),
    (lambda: sf.Causal() or sf.Full(), TypeError, r"not 'or'/'and'"),
    (lambda: sf.Full() if sf.Causal() else None, TypeError, r"truth value"),
    # Problem
    (lambda: sf.Problem(grid=0), ValueError, r"grid must be >= 1, got 0"),
    (lambda: sf.Problem(grid=(4, -1)), ValueError, r"grid\[1\] must be >= 1, got -1"),
    (lambda: sf.Problem(grid=(2, 2, 2, 2)), ValueError, r"grid must have 1, 2 or 3 dimensions"),
    (lambda: sf.Problem(grid=4, heads=0), ValueError, r"heads must be >= 1, got 0"),
    (lambda: sf.Problem(grid=4, head_dim=-1), ValueError, r"head_dim must be >= 1, got -1"),
    (lambda: sf.Problem(grid=4, heads=4, kv_heads=3), ValueError, r"kv_heads must divide heads, got kv_heads=3, heads=4"),
    (lambda: sf.Problem(grid=4, dtype="int8"), ValueError, r"dtype must be .*got 'int8'"),
    (lambda: sf.Problem(grid=4, dtype=torch.int32), ValueError, r"dtype must be one of .*got torch.int32"),
]


@pytest.mark.parametrize("make, exc, match", CONSTRUCTOR_ERRORS, ids=[m for _, _, m in CONSTRUCTOR_ERRORS])
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ------------------------------------------------------------------------------------
# patterns against a problem (dense_mask runs the checks)
# ------------------------------------------------------------------------------------
PROBLEM_ERRORS = [
    # (pattern, problem kwargs, regex); all ValueError
    (sf.Neighborhood(7), dict(grid=(5, 5)), r"kernel_size=7 is larger than the grid \(5, 5\) in dimension 0 \(7 > 5\)"),
    (sf.Neighborhood((3, 9)), dict(grid=(9, 4)), r"kernel_size=\(3, 9\) is larger than the grid \(9, 4\) in dimension 1"),
    (sf.Neighborhood(3, dilation=2), dict(grid=(5,)),
     r"kernel_size \* dilation must be <= the grid extent, got 3 \* 2 > 5 in dimension 0"),
    (sf.Neighborhood(2, dilation=(1, 3)), dict(grid=(9, 4)), r"kernel_size \* dilation .* 2 \* 3 > 4 in dimension 1"),
    (sf.Neighborhood((3, 3)), dict(grid=(9,)), r"kernel_size=\(3, 3\) has 2 entries but the grid has 1 dimension"),
    (sf.Neighborhood(3, dilation=(1, 1, 1)), dict(grid=(5, 5)), r"dilation=\(1, 1, 1\) has 3 entries but the grid has 2"),
    (sf.Neighborhood(3, stride=(1, 1)), dict(grid=(5, 5, 5)), r"stride=\(1, 1\) has 2 entries but the grid has 3"),
    (sf.Neighborhood(3, causal=(True, False, True)), dict(grid=(5, 5)), r"causal=\(True, False, True\) has 3 entries"),
    (sf.SlidingWindow((1, 2)), dict(grid=(9,)), r"left=\(1, 2\) has 2 entries but the grid has 1 dimension"),
    (sf.SlidingWindow(1, (1, 2, 3)), dict(grid=(9, 3)), r"right=\(1, 2, 3\) has 3 entries"),
    (sf.Halo(8, 1), dict(grid=(4,)), r"block_size=8 is larger than the grid \(4,\)"),
    (sf.Halo((2, 2), 1), dict(grid=(4, 4, 4)), r"block_size=\(2, 2\) has 2 entries but the grid has 3"),
    (sf.Halo(2, (1, 1)), dict(grid=(4,)), r"halo=\(1, 1\) has 2 entries"),
    (sf.Blocks(8), dict(grid=(9, 4)), r"size=8 is larger than the grid \(9, 4\) in dimension 1"),
    (sf.Blocks((2, 2)), dict(grid=(8,)), r"size=\(2, 2\) has 2 entries"),
    (sf.Grid(4), dict(grid=(6,)), r"Grid size=4 must divide the grid extent 6 in dimension 0 .*"
                                   r"sizes that divide it: \[1, 2, 3, 6\]"),
    (sf.Grid((4, 2)), dict(grid=(8, 7)), r"Grid size=\(4, 2\) must divide the grid extent 7 in dimension 1 .*"
                                         r"sizes that divide it: \[1, 7\]"),
    (sf.Grid((2, 2)), dict(grid=(8,)), r"size=\(2, 2\) has 2 entries"),
    (sf.Sink(10), dict(grid=(9,)), r"Sink n=10 is larger than the number of tokens 9"),
    (sf.GlobalTokens([3, 9]), dict(grid=(3, 3)), r"GlobalTokens index 9 is out of range for 9 tokens"),
    (sf.Documents([4, 4]), dict(grid=(9,)), r"Documents lengths add up to 8 but the problem has 9 tokens"),
    (sf.StridedShards(2, 1, 2, dense_heads=3), dict(grid=(9,), heads=4, kv_heads=2),
     r"dense_heads=3 is more than the 2 key/value heads"),
    (sf.PerHead([sf.Full()] * 2), dict(grid=(9,), heads=3), r"PerHead has 2 patterns but the problem has heads=3"),
    (sf.PerHead([sf.Full()] * 4), dict(grid=(9,), heads=3), r"PerHead has 4 patterns but the problem has heads=3"),
    (sf.Causal() | sf.PerHead([sf.Full()]), dict(grid=(9,), heads=2), r"PerHead has 1 patterns"),
    (sf.Causal() & sf.Neighborhood(11), dict(grid=(9,)), r"kernel_size=11 is larger than the grid"),
    (sf.PerHead([sf.Full(), sf.Grid(2)]), dict(grid=(9,), heads=2), r"Grid size=2 must divide the grid extent 9"),
    (sf.Causal(), dict(), r"Causal\(\) is defined on a token grid: give Problem\(grid=...\)"),
    (sf.Neighborhood(3), dict(), r"defined on a token grid"),
    (sf.Routed(2, 5), dict(grid=(6,)), r"topk=5 is larger than the number of regions 3"),
    (sf.Routed(8, 1), dict(grid=(6,)), r"region_size=8 is larger than the grid \(6,\)"),
    (sf.Routed((2, 2), 1), dict(grid=(6,)), r"region_size=\(2, 2\) has 2 entries but the grid has 1 dimension"),
]


@pytest.mark.parametrize("pattern, problem, match", PROBLEM_ERRORS, ids=[repr(c[0]) for c in PROBLEM_ERRORS])
def test_pattern_against_problem_errors(pattern, problem, match):
    with pytest.raises(ValueError, match=match):
        sf.dense_mask(pattern, P(**problem))
    with pytest.raises(ValueError, match=match):
        sf.describe(pattern, P(**problem))


def test_dense_mask_argument_types():
    with pytest.raises(TypeError, match=r"pattern must be a sparseforge Pattern, got 'Causal\(\)' \(str\)"):
        sf.dense_mask("Causal()", P(grid=4))
    with pytest.raises(TypeError, match=r"problem must be a sparseforge Problem, got \(4,\) \(tuple\)"):
        sf.dense_mask(sf.Causal(), (4,))


# ------------------------------------------------------------------------------------
# content-dependent inputs
# ------------------------------------------------------------------------------------
def test_routed_needs_q_and_k():
    p, problem = sf.Routed(2, 1), P(grid=6)
    with pytest.raises(ValueError, match=r"Routed\(2, 1\) routes on content: pass q= and k="):
        sf.dense_mask(p, problem)
    with pytest.raises(ValueError, match=r"pass q= and k="):
        sf.dense_mask(p, problem, q=torch.zeros(1, 1, 6, 4))
    with pytest.raises(ValueError, match=r"pass q= and k="):
        sf.describe(sf.Causal() | p, problem)


ROUTES_ERRORS = [
    (torch.tensor([[[0], [1], [3]]]), ValueError, r"routes must index regions in \[0, 3\), got values in \[0, 3\]"),
    (-torch.ones(1, 3, 1, dtype=torch.long), ValueError, r"routes must index regions in \[0, 3\)"),
    (torch.tensor([[[0], [1]]]), ValueError, r"routes must have shape \[B, \(H,\) R=3, topk=1\], got \(1, 1, 2, 1\)"),
    (torch.zeros(1, 3, 2, dtype=torch.long), ValueError, r"routes must have shape .*topk=1"),
    (torch.zeros(1, 3, 3, 1, dtype=torch.long), ValueError, r"routes must have shape"),  # 3 heads, problem has 2
    (torch.zeros(1, 3, 1), TypeError, r"routes must be an int32/int64 tensor .*got torch.float32"),
    ([[[0], [1], [2]]], TypeError, r"routes must be an int32/int64 tensor"),
]


@pytest.mark.parametrize("routes, exc, match", ROUTES_ERRORS, ids=[m for _, _, m in ROUTES_ERRORS])
def test_bad_routes(routes, exc, match):
    with pytest.raises(exc, match=match):
        sf.dense_mask(sf.Routed(2, 1), P(grid=6, heads=2), routes=routes)


def test_routes_batch_must_match_q():
    q = torch.zeros(1, 1, 6, 4, dtype=F64)
    routes = torch.zeros(2, 3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"routes must have shape .*got \(2, 1, 3, 1\)"):
        sf.reference_attention(q, q, q, sf.Routed(2, 1), P(grid=6), routes=routes)


COORDS_ERRORS = [
    (None, ValueError, r"Scattered\(2\) needs voxel coordinates: pass coords="),
    (torch.zeros(4, 3), TypeError, r"coords must have an integer dtype, got torch.float32"),
    (torch.zeros(4, 3, dtype=torch.bool), TypeError, r"coords must have an integer dtype, got torch.bool"),
    ([[0, 0, 0]], TypeError, r"coords must be an integer tensor \[N, 1 \+ ndim\], got list"),
    (torch.zeros(4, dtype=torch.long), ValueError, r"coords must have shape \[N, 1 \+ ndim\] .*got \(4,\)"),
    (torch.zeros(4, 1, dtype=torch.long), ValueError, r"coords must have shape .*got \(4, 1\)"),
    (torch.zeros(4, 5, dtype=torch.long), ValueError, r"coords must have shape .*ndim in 1..3.*got \(4, 5\)"),
    (torch.zeros(2, 4, 3, dtype=torch.long), ValueError, r"coords must have shape"),
    (torch.tensor([[0, 1, 2], [0, -1, 0]]), ValueError, r"coords must be non-negative, got a minimum of -1"),
    (torch.tensor([[-1, 1, 2]]), ValueError, r"coords must be non-negative"),
]


@pytest.mark.parametrize("coords, exc, match", COORDS_ERRORS, ids=[m for _, _, m in COORDS_ERRORS])
def test_bad_coords(coords, exc, match):
    with pytest.raises(exc, match=match):
        sf.dense_mask(sf.Scattered(2), P(), coords=coords)


def test_coords_rank_and_count():
    with pytest.raises(ValueError, match=r"window_size=\(2, 2\) has 2 entries but the grid has 3 dimensions"):
        sf.dense_mask(sf.Scattered((2, 2)), P(), coords=torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shift=\(1, 1\) has 2 entries"):
        sf.dense_mask(sf.Scattered(2, shift=(1, 1)), P(), coords=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"coords has 4 voxels but the problem grid has 5 tokens"):
        sf.dense_mask(sf.Scattered(2), P(grid=5), coords=torch.zeros(4, 3, dtype=torch.long))


def test_scattered_reference_needs_coords_and_matching_voxels():
    x = torch.zeros(6, 1, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"needs voxel coordinates: pass coords="):
        sf.reference_attention(x, x, x, sf.Scattered(2), P())
    with pytest.raises(ValueError, match=r"q has shape \(1, 1, 6, 4\), expected \(1, 1, 5, 4\)"):
        sf.reference_attention(x, x, x, sf.Scattered(2), P(), coords=torch.zeros(5, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------
# reference_attention input checks
# ------------------------------------------------------------------------------------
def _t(*shape, dtype=F64, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


GOOD = dict(q=(1, 2, 6, 4), k=(1, 1, 6, 4), v=(1, 1, 6, 4))
PROB = dict(grid=6, heads=2, kv_heads=1, head_dim=4)

QKV_ERRORS = [
    # (overrides {name: tensor or value}, exception, regex)
    (dict(q=[0.0]), TypeError, r"q must be a torch.Tensor, got list"),
    (dict(k=None), TypeError, r"k must be a torch.Tensor, got NoneType"),
    (dict(v=_t(1, 1, 6, 4, dtype=torch.long)), TypeError, r"v must have a floating dtype, got torch.int64"),
    (dict(q=_t(1, 2, 6, 4, dtype=torch.int32)), TypeError, r"q must have a floating dtype, got torch.int32"),
    (dict(q=_t(2, 6, 4, 1, 1)), ValueError, r"q must have shape \[B, H, N, D\], got \(2, 6, 4, 1, 1\)"),
    (dict(k=_t(6, 4)), ValueError, r"k must have shape \[B, H, N, D\], got \(6, 4\)"),
    (dict(k=_t(1, 1, 6, 4, dtype=torch.float32)), TypeError,
     r"q, k and v must have one dtype, got torch.float64, torch.float32, torch.float64"),
    (dict(v=_t(1, 1, 6, 4, device="meta")), ValueError, r"q, k and v must be on one device, got cpu, cpu, meta"),
    (dict(q=_t(1, 1, 6, 4)), ValueError, r"q has shape \(1, 1, 6, 4\), expected \(1, 2, 6, 4\) \[B, H, N, D\]"),
    (dict(q=_t(1, 2, 7, 4)), ValueError, r"q has shape \(1, 2, 7, 4\), expected \(1, 2, 6, 4\)"),
    (dict(q=_t(1, 2, 6, 8)), ValueError, r"q has shape \(1, 2, 6, 8\), expected \(1, 2, 6, 4\)"),
    (dict(k=_t(1, 2, 6, 4)), ValueError, r"k has shape \(1, 2, 6, 4\), expected \(1, 1, 6, 4\) \[B, kv_heads, N, D\]"),
    (dict(v=_t(2, 1, 6, 4)), ValueError, r"v has shape \(2, 1, 6, 4\), expected \(1, 1, 6, 4\)"),
    (dict(v=_t(1, 1, 5, 4)), ValueError, r"v has shape \(1, 1, 5, 4\)"),
]


@pytest.mark.parametrize("override, exc, match", QKV_ERRORS, ids=[m for _, _, m in QKV_ERRORS])
def test_reference_attention_input_errors(override, exc, match):
    args = {name: _t(*shape) for name, shape in GOOD.items()}
    args.update(override)
    with pytest.raises(exc, match=match):
        sf.reference_attention(args["q"], args["k"], args["v"], sf.Causal(), P(**PROB))


def test_reference_attention_good_inputs_pass():
    args = {name: _t(*shape) for name, shape in GOOD.items()}
    out = sf.reference_attention(args["q"], args["k"], args["v"], sf.Causal(), P(**PROB))
    assert out.shape == GOOD["q"]


def test_reference_attention_pattern_and_problem_types():
    x = _t(1, 1, 6, 4)
    with pytest.raises(TypeError, match=r"pattern must be a sparseforge Pattern"):
        sf.reference_attention(x, x, x, None, P(grid=6))
    with pytest.raises(TypeError, match=r"problem must be a sparseforge Problem"):
        sf.reference_attention(x, x, x, sf.Causal(), dict(grid=6))


# ------------------------------------------------------------------------------------
# the safe parser
# ------------------------------------------------------------------------------------
PARSE_ERRORS = [
    ("__import__('os')", r"unknown pattern '__import__'; known patterns: Blocks, Causal"),
    ("__import__('os').system('true')", r"only sparseforge pattern constructors may be called"),
    ("os.system('true')", r"only sparseforge pattern constructors may be called \(at 'os.system'\)"),
    ("getattr(sf, 'Causal')()", r"only sparseforge pattern constructors may be called"),
    ("sf.Causal().__class__", r"Attribute is not allowed"),
    ("Causal().__class__.__bases__", r"Attribute is not allowed"),
    ("sf.__dict__", r"Attribute is not allowed"),
    ("sf.os", r"Attribute is not allowed"),
    ("lambda: Causal()", r"Lambda is not allowed"),
    ("Causal() or Full()", r"BoolOp is not allowed"),
    ("Causal() if 1 else Full()", r"IfExp is not allowed"),
    ("[Causal() for _ in (1,)]", r"ListComp is not allowed"),
    ("Causal()[0]", r"Subscript is not allowed"),
    ("{'a': Causal()}", r"Dict is not allowed"),
    ("(p := Causal())", r"NamedExpr is not allowed"),
    ("f'{Causal()}'", r"JoinedStr is not allowed"),
    ("~Causal()", r"only '-' on an int is allowed"),
    ("Sink(-True)", r"only '-' on an int is allowed"),
    ("Foo(3)", r"unknown pattern 'Foo'; known patterns: .*Neighborhood"),
    ("Union((Causal(),))", r"unknown pattern 'Union'"),
    ("Intersection((Causal(),))", r"unknown pattern 'Intersection'"),
    ("Pattern()", r"unknown pattern 'Pattern'"),
    ("Problem(grid=4)", r"unknown pattern 'Problem'"),
    ("dense_mask(Causal(), 1)", r"unknown pattern 'dense_mask'"),
    ("Neighborhood(x)", r"unknown name 'x'"),
    ("Neighborhood(kernel_size)", r"unknown name 'kernel_size'"),
    ("Neighborhood(3.5)", r"only int, bool and None literals are allowed, got 3\.5"),
    ("Neighborhood('3')", r"only int, bool and None literals are allowed, got '3'"),
    ("Neighborhood(b'3')", r"only int, bool and None literals"),
    ("Neighborhood(3", r"is not valid syntax"),
    ("Causal(); Full()", r"is not valid syntax"),
    ("import os", r"is not valid syntax"),
    ("", r"is not valid syntax"),
    ("3", r"evaluates to 3, not a pattern"),
    ("(Causal(), Full())", r"evaluates to \(Causal\(\), Full\(\)\), not a pattern"),
    ("[Causal()]", r"not a pattern"),
    ("None", r"evaluates to None, not a pattern"),
    ("Causal() | 3", r"'\|' and '&' combine two patterns"),
    ("Causal() & [Full()]", r"'\|' and '&' combine two patterns"),
    ("Causal() + Full()", r"only pattern '\|'/'&', list '\+' and list '\* int' are allowed"),
    ("[Causal()] * 5000", r"list '\* int' are allowed"),
    ("[Causal()] * -1", r"list '\* int' are allowed"),
    ("PerHead([Causal()] * 2 ** 3)", r"list '\* int' are allowed"),
    ("PerHead([Full()] * 4096 * 4096)", r"list '\* 4096' makes a list of 16777216 items; at most 65536 are allowed"),
    ("Neighborhood(*[3])", r"\*args and \*\*kwargs are not allowed"),
    ("Neighborhood(**{'kernel_size': 3})", r"\*args and \*\*kwargs are not allowed"),
    ("Neighborhood(kernel=3)", r"unexpected keyword argument 'kernel'"),
    ("Neighborhood(3, 1, 1, False, 5)", r"Neighborhood.*takes .* positional arguments"),
    ("Neighborhood(3, dilation=None)", r"dilation must be an int, got None"),
    ("Causal(1)", r"Causal.*takes 1 positional argument"),
]


@pytest.mark.parametrize("text, match", PARSE_ERRORS, ids=[t or "<empty>" for t, _ in PARSE_ERRORS])
def test_parse_errors(text, match):
    with pytest.raises(sf.PatternSyntaxError, match=match) as info:
        sf.parse_pattern(text)
    assert isinstance(info.value, ValueError)
    assert repr(text) in str(info.value)  # the message quotes the whole expression


@pytest.mark.parametrize("text", [
    "PerHead(" + "[Full()]" + " * 1" * 5000 + ")",           # an AST 5000 deep
    "Full() | " + "(" * 5000 + "Full()" + ")" * 5000,         # brackets past Python's limit
    " | ".join(["Full()"] * 200) + " | " + "Full() or " * 3000 + "Full()",  # a chain beside other operators
])
def test_too_deep_is_a_clean_parse_error(text):
    with pytest.raises(sf.PatternSyntaxError) as info:
        sf.parse_pattern(text)
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000           # the long text is elided
    assert "more characters" in message


def test_parse_value_errors_come_from_the_constructor():
    with pytest.raises(ValueError, match=r"kernel_size must be >= 1, got 0"):
        sf.parse_pattern("Neighborhood(0)")
    with pytest.raises(ValueError, match=r"stride must be <= kernel_size"):
        sf.parse_pattern("Neighborhood(3, stride=-(-4))")


def test_parse_needs_a_string():
    with pytest.raises(TypeError, match=r"pattern expression must be a str, got int"):
        sf.parse_pattern(3)
    with pytest.raises(TypeError, match=r"pattern expression must be a str, got Causal"):
        sf.parse_pattern(sf.Causal())


def test_parser_never_evaluates(monkeypatch):
    """The parser must not reach eval/exec/compile, even for malicious text."""
    import builtins

    def boom(*a, **k):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    assert sf.parse_pattern("PerHead([Neighborhood(3)] * 2 + [Blocks(2)])") == \
        sf.PerHead([sf.Neighborhood(3)] * 2 + [sf.Blocks(2)])
    with pytest.raises(sf.PatternSyntaxError):
        sf.parse_pattern("__import__('os').system('echo pwned')")


# ------------------------------------------------------------------------------------
# load_pattern (path.py:name)
# ------------------------------------------------------------------------------------
def test_load_pattern(tmp_path):
    f = tmp_path / "pats.py"
    f.write_text("import sparseforge as sf\n"
                 "na = sf.Neighborhood(3)\n"
                 "def heads():\n    return sf.PerHead([sf.Causal(), sf.Full()])\n"
                 "number = 3\n")
    assert sf.load_pattern(f"{f}:na") == sf.Neighborhood(3)
    assert sf.load_pattern(f"{f}:heads") == sf.PerHead([sf.Causal(), sf.Full()])
    assert sf.load_pattern("Causal() | Sink(2)") == sf.Causal() | sf.Sink(2)
    with pytest.raises(ValueError, match=r"has no pattern named 'nope'; it defines: .*na"):
        sf.load_pattern(f"{f}:nope")
    with pytest.raises(ValueError, match=r"is int, not a sparseforge pattern"):
        sf.load_pattern(f"{f}:number")
    with pytest.raises(ValueError, match=r"pattern file .*missing\.py.* does not exist"):
        sf.load_pattern(f"{tmp_path / 'missing.py'}:na")


def test_load_pattern_file_that_exits(tmp_path):
    f = tmp_path / "quits.py"
    f.write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(ValueError, match=r"pattern file '.*quits\.py' called sys\.exit\(0\) while it was imported"):
        sf.load_pattern(f"{f}:p")
    g = tmp_path / "quits_later.py"
    g.write_text("def p():\n    raise SystemExit('bye')\n")
    with pytest.raises(ValueError, match=r"quits_later\.py:p\(\) called sys\.exit\('bye'\)"):
        sf.load_pattern(f"{g}:p")


ROUTING_QK_ERRORS = [
    # (q shape, k shape, problem kwargs, exception, regex)
    ((1, 1, 5, 4), (1, 1, 5, 4), dict(grid=6), ValueError, r"q has shape \(1, 1, 5, 4\), expected \[B, H=1, N=6, D\]"),
    ((1, 6, 4), (1, 6, 4), dict(grid=6), ValueError, r"q must have shape \[B, H, N, D\], got \(1, 6, 4\)"),
    ((1, 2, 6, 4), (1, 2, 6, 4), dict(grid=6), ValueError, r"q has shape \(1, 2, 6, 4\), expected \[B, H=1"),
    ((1, 1, 6, 4), (2, 1, 6, 4), dict(grid=6), ValueError, r"k has shape \(2, 1, 6, 4\), expected \[B=1"),
    ((1, 4, 6, 4), (1, 3, 6, 4), dict(grid=6, heads=4), ValueError, r"k has shape \(1, 3, 6, 4\), expected .*kv_heads=4"),
    ((1, 1, 6, 4), (1, 1, 6, 3), dict(grid=6), ValueError, r"k has shape \(1, 1, 6, 3\), expected .*D=4"),
]


@pytest.mark.parametrize("qs, ks, problem, exc, match", ROUTING_QK_ERRORS, ids=[c[-1] for c in ROUTING_QK_ERRORS])
def test_routed_q_k_shapes(qs, ks, problem, exc, match):
    with pytest.raises(exc, match=match):
        sf.dense_mask(sf.Routed(2, 1), P(**problem), q=_t(*qs), k=_t(*ks))


def test_routed_q_k_types():
    k = _t(1, 1, 6, 4)
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor, got list"):
        sf.dense_mask(sf.Routed(2, 1), P(grid=6), q=[0.0], k=k)
    with pytest.raises(TypeError, match=r"q must have a floating dtype, got torch.int64"):
        sf.dense_mask(sf.Routed(2, 1), P(grid=6), q=_t(1, 1, 6, 4, dtype=torch.long), k=k)
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor, got tuple"):
        sf.reference_attention(k, (1,), k, sf.Routed(2, 1), P(grid=6))
    # k with all H heads is accepted for a GQA problem too (dense_mask takes either)
    q = torch.randn(1, 2, 6, 4)
    a = sf.dense_mask(sf.Routed(2, 1), P(grid=6, heads=2, kv_heads=1), q=q, k=q[:, :1])
    b = sf.dense_mask(sf.Routed(2, 1), P(grid=6, heads=2, kv_heads=1), q=q, k=q[:, :1].expand(1, 2, 6, 4))
    assert torch.equal(a, b)
