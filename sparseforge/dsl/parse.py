"""Reading patterns from text: a safe DSL-expression parser and ``path.py:name`` loading.

The parser walks Python's AST and accepts only: sparseforge pattern constructors (bare or
as ``sf.X`` / ``sparseforge.X``), int/bool/None literals, tuples and lists, ``-`` on ints,
list ``+`` and ``* int`` (for ``PerHead([a] * 4 + [b] * 4)``), and ``|``/``&`` between
patterns. Nothing is ever passed to ``eval``.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

from . import content, local, sequence  # noqa: F401  (the families the parser names)
from .pattern import Pattern, registry

_MODULE_ALIASES = ("sf", "sparseforge")


class PatternSyntaxError(ValueError):
    """A DSL expression that is not a valid sparseforge pattern."""


def parse_pattern(text: str) -> Pattern:
    """Parse a DSL expression such as ``"Causal() & (SlidingWindow(4096) | Sink(4))"``."""
    if not isinstance(text, str):
        raise TypeError(f"pattern expression must be a str, got {type(text).__name__}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise PatternSyntaxError(f"pattern expression {text!r} is not valid syntax: {e.msg}") from None
    value = _Evaluator(text).visit(tree.body)
    if not isinstance(value, Pattern):
        raise PatternSyntaxError(f"pattern expression {text!r} evaluates to {value!r}, not a pattern")
    return value


class _Evaluator(ast.NodeVisitor):
    def __init__(self, text: str):
        self.text = text
        self.names = registry()

    def fail(self, node, why: str):
        where = ast.get_source_segment(self.text, node) or type(node).__name__
        raise PatternSyntaxError(f"in pattern expression {self.text!r}: {why} (at {where!r})")

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
            raise PatternSyntaxError(f"in pattern expression {self.text!r}: {e}") from None

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
        module_spec.loader.exec_module(module)
        if not hasattr(module, name):
            found = sorted(k for k, v in vars(module).items() if isinstance(v, Pattern) or
                           (callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == mod_name))
            raise ValueError(f"{path_text} has no pattern named {name!r}; it defines: {', '.join(found)}")
        value = getattr(module, name)
        if callable(value) and not isinstance(value, Pattern):
            value = value()
        if not isinstance(value, Pattern):
            raise ValueError(f"{spec} is {type(value).__name__}, not a sparseforge pattern")
        return value
    return parse_pattern(spec)
