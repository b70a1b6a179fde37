"""Reading patterns from text: a safe DSL-expression parser and ``path.py:name`` loading.

The parser walks Python's AST and accepts only: sparseforge pattern constructors (bare or
as ``sf.X`` / ``sparseforge.X``), int/bool/None literals, tuples and lists, ``-`` on ints,
list ``+`` and ``* int`` (for ``PerHead([a] * 4 + [b] * 4)``; at most ``MAX_LIST_ITEMS``
items), and ``|``/``&`` between patterns. Nothing is ever passed to ``eval``.

Long chains (the repr of a union of hundreds of parts is ``(a | b | c | ...)``) would make
Python's AST as deep as the chain is long, past its recursion limits; chains of more than
``CHAIN_SPLIT`` operands are therefore bracketed as a balanced tree before parsing (``|``,
``&`` and list ``+`` are associative, and unions and intersections flatten), so the depth
grows with the logarithm of the length.
"""
from __future__ import annotations

import ast
import bisect
import importlib.util
import io
import sys
import tokenize
from pathlib import Path

from . import content, local, sequence  # noqa: F401  (the families the parser names)
from .pattern import Pattern, registry

_MODULE_ALIASES = ("sf", "sparseforge")
#: Most items a list built with ``+``/``*`` may have (a PerHead's heads, Documents' lengths).
MAX_LIST_ITEMS = 65536
#: Chains of ``|``, ``&`` or list ``+`` with more operands than this are bracketed as a balanced tree.
CHAIN_SPLIT = 32


class PatternSyntaxError(ValueError):
    """A DSL expression that is not a valid sparseforge pattern."""


def parse_pattern(text: str) -> Pattern:
    """Parse a DSL expression such as ``"Causal() & (SlidingWindow(4096) | Sink(4))"``."""
    if not isinstance(text, str):
        raise TypeError(f"pattern expression must be a str, got {type(text).__name__}")
    source = balance_chains(text.strip())
    try:
        try:
            tree = ast.parse(source, mode="eval")
        except SyntaxError as e:
            raise PatternSyntaxError(f"pattern expression {_quote(text)} is not valid syntax: {e.msg}") from None
        value = _Evaluator(text, source).visit(tree.body)
    except (RecursionError, MemoryError) as e:
        raise PatternSyntaxError(f"pattern expression {_quote(text)} is nested too deeply to parse "
                                 f"({type(e).__name__}); expected an expression at most a few hundred levels "
                                 "deep") from None
    if not isinstance(value, Pattern):
        raise PatternSyntaxError(f"pattern expression {_quote(text)} evaluates to {_elide(repr(value))}, "
                                 "not a pattern")
    return value


def _elide(text: str, limit: int = 400) -> str:
    """``text``, its middle elided past ``limit`` characters (messages stay readable)."""
    if len(text) <= limit:
        return text
    head, tail = text[:limit * 3 // 4], text[-(limit // 4):]
    return f"{head} ...[{len(text) - len(head) - len(tail)} more characters]... {tail}"


def _quote(text: str, limit: int = 400) -> str:
    return repr(_elide(text, limit))


# -- balanced chains --------------------------------------------------------------------
_CHAIN_OPS = ("|", "&", "+")          # lowest precedence first
_KEEP_OUT = {":=", "^", "<<", ">>", "<", ">", "==", "!=", "<=", ">=", ":", "->", "@", "/", "//", "%", "**", "~",
             "-", "lambda", "if", "else", "or", "and", "not", "in", "is", "for", "async", "await", "yield"}
_SKIP = {tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT}


def balance_chains(text: str) -> str:
    """``text`` with every chain of more than ``CHAIN_SPLIT`` operands of ``|``, ``&`` or ``+``
    bracketed as a balanced binary tree: ``a | b | c | d`` -> ``(a | b) | (c | d)``. The same
    value (the operators are associative here), an AST of logarithmic depth. Text that does
    not tokenize, or a chain beside other operators, is left for the parser to judge."""
    if sum(text.count(op) for op in _CHAIN_OPS) <= CHAIN_SPLIT:
        return text
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in _SKIP]
    except (tokenize.TokenError, SyntaxError):
        return text
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    begin = [starts[t.start[0] - 1] + t.start[1] for t in tokens]
    end = [starts[t.end[0] - 1] + t.end[1] for t in tokens]
    inserts: list[tuple[int, int, int, str]] = []  # (offset, 0 for ')' else 1, order, text)

    def segment(lo: int, hi: int, ops: dict[str, list[int]], bad: bool) -> None:
        """Tokens lo..hi-1, one expression between brackets/commas; ``ops``: where its
        depth-0 chain operators are."""
        if bad or lo >= hi:
            return
        if hi - lo > 2 and tokens[lo].type == tokenize.NAME and tokens[lo + 1].string == "=":
            lo += 2  # a keyword argument's value
        split(lo, hi, ops, 0)

    def split(lo: int, hi: int, ops: dict[str, list[int]], level: int) -> None:
        if level == len(_CHAIN_OPS):
            return
        at = ops[_CHAIN_OPS[level]]  # sorted token indices
        cuts = at[bisect.bisect_left(at, lo):bisect.bisect_left(at, hi)]
        bounds = [lo] + [c + 1 for c in cuts]
        operands = list(zip(bounds, cuts + [hi]))
        if any(a >= b for a, b in operands):
            return  # an empty operand: a syntax error, for the parser to report
        if len(operands) > CHAIN_SPLIT:
            bracket(operands, 0, len(operands))
        for a, b in operands:
            split(a, b, ops, level + 1)

    def bracket(operands, lo: int, hi: int) -> None:
        if hi - lo < 2:
            return
        mid = (lo + hi) // 2
        for a, b in ((lo, mid), (mid, hi)):
            if b - a >= 2:
                first, last = operands[a][0], operands[b - 1][1] - 1
                span = end[last] - begin[first]
                inserts.append((begin[first], 1, -span, "("))
                inserts.append((end[last], 0, span, ")"))
            bracket(operands, a, b)

    # one pass over the tokens with a stack of open segments (start, chain operators, bad)
    stack: list[tuple[int, dict[str, list[int]], bool]] = [(0, {op: [] for op in _CHAIN_OPS}, False)]
    for i, tok in enumerate(tokens):
        text_ = tok.string if tok.type in (tokenize.OP, tokenize.NAME) else ""
        if text_ in ("(", "[", "{"):
            stack.append((i + 1, {op: [] for op in _CHAIN_OPS}, False))
        elif text_ in (")", "]", "}") or text_ == ",":
            if len(stack) == 1 and text_ != ",":
                return text  # unbalanced: the parser reports it
            lo, ops, bad = stack.pop()
            segment(lo, i, ops, bad)
            if text_ == ",":
                stack.append((i + 1, {op: [] for op in _CHAIN_OPS}, False))
        elif text_ in _CHAIN_OPS:
            stack[-1][1][text_].append(i)
        elif text_ in _KEEP_OUT or text_ in ("*", "**") and i == stack[-1][0]:
            lo, ops, _ = stack[-1]
            stack[-1] = (lo, ops, True)
    if len(stack) != 1:
        return text
    lo, ops, bad = stack.pop()
    segment(lo, len(tokens), ops, bad)
    if not inserts:
        return text
    out, at = [], 0
    for offset, _, _, piece in sorted(inserts):
        out.append(text[at:offset])
        out.append(piece)
        at = offset
    out.append(text[at:])
    return "".join(out)


class _Evaluator(ast.NodeVisitor):
    def __init__(self, text: str, source: str | None = None):
        self.text = text                                     # what the user wrote, for messages
        self.source = text.strip() if source is None else source   # what was parsed
        self.names = registry()

    def fail(self, node, why: str):
        where = ast.get_source_segment(self.source, node) or type(node).__name__
        raise PatternSyntaxError(f"in pattern expression {_quote(self.text)}: {why} (at {_quote(where, 120)})")

    def generic_visit(self, node):
        self.fail(node, f"{type(node).__name__} is not allowed; use pattern constructors, literals, '|' and '&'")

    def visit_Constant(self, node):
        if isinstance(node.value, (int, bool)) or node.value is None:
            return node.value
        self.fail(node, f"only int, bool and None literals are allowed, got {node.value!r}")

    def visit_Tuple(self, node):
        return tuple(self.visit(e) for e in node.elts)

    def visit_List(self, node):
        return [self.visit(e) for e in node.elts]

    def visit_UnaryOp(self, node):
        value = self.visit(node.operand)
        if isinstance(node.op, ast.USub) and isinstance(value, int) and not isinstance(value, bool):
            return -value
        self.fail(node, "only '-' on an int is allowed")

    def visit_BinOp(self, node):
        a, b = self.visit(node.left), self.visit(node.right)
        if isinstance(node.op, (ast.BitOr, ast.BitAnd)):
            if not (isinstance(a, Pattern) and isinstance(b, Pattern)):
                self.fail(node, "'|' and '&' combine two patterns")
            return a | b if isinstance(node.op, ast.BitOr) else a & b
        if isinstance(node.op, ast.Add) and isinstance(a, list) and isinstance(b, list):
            return a + b
        if isinstance(node.op, ast.Mult) and isinstance(a, list) and isinstance(b, int) and 0 <= b <= 4096:
            if len(a) * b > MAX_LIST_ITEMS:
                self.fail(node, f"list '* {b}' makes a list of {len(a) * b} items; "
                                f"at most {MAX_LIST_ITEMS} are allowed")
            return a * b
        self.fail(node, "only pattern '|'/'&', list '+' and list '* int' are allowed")

    def _constructor(self, func):
        if isinstance(func, ast.Name):
            name = func.id
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in _MODULE_ALIASES:
            name = func.attr
        else:
            self.fail(func, "only sparseforge pattern constructors may be called")
        if name not in self.names:
            known = ", ".join(sorted(self.names))
            self.fail(func, f"unknown pattern {name!r}; known patterns: {known}")
        return self.names[name]

    def visit_Call(self, node):
        cls = self._constructor(node.func)
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            self.fail(node, "*args and **kwargs are not allowed")
        args = [self.visit(a) for a in node.args]
        kwargs = {k.arg: self.visit(k.value) for k in node.keywords}
        try:
            return cls(*args, **kwargs)
        except (TypeError, ValueError) as e:
            raise PatternSyntaxError(f"in pattern expression {_quote(self.text)}: {e}") from None

    def visit_Name(self, node):
        self.fail(node, f"unknown name {node.id!r}")


def load_pattern(spec: str) -> Pattern:
    """A pattern from ``path.py:name`` (a module-level pattern, or a function of no
    arguments returning one) or from a DSL expression."""
    if isinstance(spec, str) and ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        path_text, name = spec.rsplit(":", 1)
        path = Path(path_text)
        if not path.is_file():
            raise ValueError(f"pattern file {path_text!r} does not exist")
        mod_name = f"_sparseforge_patterns_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except SystemExit as e:  # exit() in a pattern file must not end the caller (a CLI would exit 0 silently)
            raise ValueError(f"pattern file {path_text!r} called sys.exit({e.code!r}) while it was imported; "
                             "expected a file that defines patterns") from None
        if not hasattr(module, name):
            found = sorted(k for k, v in vars(module).items() if isinstance(v, Pattern) or
                           (callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == mod_name))
            raise ValueError(f"{path_text} has no pattern named {name!r}; it defines: {', '.join(found)}")
        value = getattr(module, name)
        if callable(value) and not isinstance(value, Pattern):
            try:
                value = value()
            except SystemExit as e:
                raise ValueError(f"{spec}() called sys.exit({e.code!r}); expected it to return a pattern") from None
        if not isinstance(value, Pattern):
            raise ValueError(f"{spec} is {type(value).__name__}, not a sparseforge pattern")
        return value
    return parse_pattern(spec)
