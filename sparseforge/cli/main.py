"""The ``sparseforge`` command line: the drive stage, a thin layer over the others.

Adding a command: define a function with ``@command()`` (a subcommand of ``main`` whose
errors become one-line messages), reuse ``pattern_argument`` / ``problem_options`` and
turn their values into objects with ``load_pattern_arg`` / ``problem_from_options``.
Raise ``InputError`` for bad input (exit 2) and ``click.ClickException`` for failures
(exit 1); any other exception becomes a one-line "internal error" unless ``--debug``.
click's own usage errors (unknown option, missing argument, bad choice) and Python warnings
are one line on stderr as well.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import click

from .. import envvars

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class InputError(click.ClickException):
    """Bad input from the command line: one line on stderr, exit status 2."""

    exit_code = 2

    def __init__(self, param: str | None, message: str):
        message = " ".join(str(message).split("\n"))
        super().__init__(f"Invalid value for {param}: {message}" if param else message)


@dataclass
class Settings:
    """Group-level options, on ``ctx.obj`` for every command."""

    debug: bool = False


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    settings = ctx.find_object(Settings) if ctx else None
    return settings.debug if settings else False


SIZE_OPTION = "sparseforge.size_option"


@contextlib.contextmanager
def user_errors(param: str | None = None, *, paths: bool = False):
    """Turn ``ValueError``/``TypeError`` raised inside into an ``InputError`` about ``param``
    and anything unexpected into a one-line internal error; with ``--debug`` re-raise as is.

    A step refused by the memory budget is an ``InputError`` about the size option the
    command was given (``--grid``/``--seq``), else ``param``. A file error (``OSError``) in the
    cache directory is an ``InputError`` naming ``SPARSEFORGE_CACHE_DIR``; elsewhere it is one
    about ``param`` when ``paths`` (the block writes where ``param`` says), else internal."""
    try:
        yield
    except click.ClickException:
        raise
    except (ValueError, TypeError) as e:
        if _debug():
            raise
        from ..dsl.budget import MemoryBudgetError

        if isinstance(e, MemoryBudgetError):
            ctx = click.get_current_context(silent=True)
            raise InputError((ctx.meta.get(SIZE_OPTION) if ctx else None) or param, str(e)) from e
        raise InputError(param, str(e)) from e
    except OSError as e:
        if _debug():
            raise
        if _in_cache_dir(e):
            raise InputError(None, envvars.cache_dir_problem() or
                             f"environment variable {envvars.CACHE_DIR.name}: {os_error_text(e)}") from e
        if paths:
            raise InputError(param, os_error_text(e)) from e
        raise _internal(e) from e
    except Exception as e:  # noqa: BLE001 — the CLI's promise: no traceback without --debug
        if _debug():
            raise
        raise _internal(e) from e


def _internal(e: BaseException) -> click.ClickException:
    return click.ClickException(f"internal error: {type(e).__name__}: {' '.join(str(e).split())} "
                                "(run 'sparseforge --debug ...' for the traceback)")


def os_error_text(e: OSError) -> str:
    """One phrase for a file error: the message of one raised with a message only, else
    '<reason>: '<file>''."""
    if e.filename is None or e.strerror is None:
        return " ".join(str(e).split())
    return f"{e.strerror}: '{e.filename}'"


def _in_cache_dir(e: OSError) -> bool:
    try:
        cache = os.path.abspath(envvars.cache_dir())
    except Exception:  # noqa: BLE001 — no cache dir to blame
        return False
    for name in (e.filename, e.filename2):
        if isinstance(name, (str, os.PathLike)):
            path = os.path.abspath(name)
            if path == cache or path.startswith(cache.rstrip(os.sep) + os.sep):
                return True
    return False


@contextlib.contextmanager
def one_line_usage_errors():
    """click's usage errors (``Usage: ...``, ``Try ...``, blank line, ``Error: ...``) as one line."""
    try:
        yield
    except getattr(click.exceptions, "NoArgsIsHelpError", ()):
        raise  # 'sparseforge' alone prints the help (click >= 8.2)
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx is not None else "sparseforge"
        raise InputError(None, f"{e.format_message()} (see '{command} --help')") from None


class Group(click.Group):
    """A click group whose usage errors, its own and its subcommands', are one line (exit 2)."""

    def make_context(self, info_name, args, parent=None, **extra):
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with one_line_usage_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def one_line_warnings():
    """Python warnings as one line on stderr: ``Warning: <message> (<Category>, <file>:<line>)``."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        click.echo(f"Warning: {text} ({category.__name__}, {Path(filename).name}:{lineno})", err=True)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


@click.group(cls=Group, context_settings=CONTEXT_SETTINGS)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors "
              f"(also ${envvars.DEBUG.name}=1).")
@click.version_option(package_name="sparseforge", prog_name="sparseforge")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """sparseforge: a compiler for sparse attention.

    PATTERN arguments are a DSL expression such as "Neighborhood(7, dilation=2)" or
    "Causal() & (SlidingWindow(256) | Sink(4))", or path.py:name naming a pattern (or a
    function returning one) in a Python file, e.g. examples/patterns.py:neighborhood_2d.
    """
    try:
        env_debug = envvars.debug()
        envvars.memory_budget()
    except ValueError as e:
        raise InputError(None, str(e)) from None
    ctx.obj = Settings(debug=debug or env_debug)
    if not ctx.obj.debug:
        ctx.with_resource(one_line_warnings())


def command(*args, **kwargs):
    """``@main.command`` whose body runs inside ``user_errors()``."""
    def decorate(f):
        @functools.wraps(f)
        def wrapper(*a, **k):
            with user_errors():
                return f(*a, **k)
        return main.command(*args, **kwargs)(wrapper)
    return decorate


# ------------------------------------------------------------------------------------
# Shared arguments: the pattern and the problem it is applied to
# ------------------------------------------------------------------------------------
class PositiveInt(click.ParamType):
    """An int >= 1 whose errors are one-line ``InputError``s naming the option."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                raise InputError(_hint(param, ctx), f"{value!r} is not an integer") from None
        if number < 1:
            raise InputError(_hint(param, ctx), f"{number} must be >= 1")
        return number


def _hint(param, ctx) -> str:
    return param.get_error_hint(ctx) if param is not None else "value"


def pattern_argument(f):
    return click.argument("pattern", metavar="PATTERN")(f)


def load_pattern_arg(spec: str):
    """The pattern named by a PATTERN argument; bad specs become an ``InputError``."""
    from ..dsl import load_pattern

    with user_errors("'PATTERN'"):
        try:
            return load_pattern(spec)
        except (ValueError, TypeError):
            raise
        except Exception as e:  # a pattern file that fails while it is imported
            if _debug():
                raise
            raise InputError("'PATTERN'", f"loading {spec!r} failed: {type(e).__name__}: {e}") from e


def parse_sizes(text: str, option: str, what: str, example: str) -> tuple[int, ...]:
    """Sizes joined by 'x' (``56x56``) or ',' (``0,0``) as a tuple of non-negative ints."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(option, f"{text!r} is not {what}; write integers joined by 'x' or ',', "
                                 f"e.g. {example}") from None
    if any(v < 0 for v in values):
        raise InputError(option, f"{text!r} has a negative entry; {what} has entries >= 0")
    return values


def problem_options(f):
    """``--grid``, ``--seq`` and ``--heads``: the problem a pattern is applied to."""
    f = click.option("--heads", type=PositiveInt(), default=None, metavar="H",
                     help="Query heads [default: the PerHead length, else 1].")(f)
    f = click.option("--seq", type=PositiveInt(), default=None, metavar="N",
                     help="A 1-D sequence of N tokens (same as --grid N).")(f)
    f = click.option("--grid", "grid_text", default=None, metavar="SxS",
                     help="Token grid, sizes joined by 'x': 4096, 56x56 or 8x28x28.")(f)
    return f


def default_heads(pattern) -> int:
    """The PerHead length for a pattern that has one, else 1."""
    from ..dsl import PerHead

    return next((len(p.patterns) for p in pattern.walk() if isinstance(p, PerHead)), 1)


def problem_from_options(pattern, grid_text: str | None, seq: int | None, heads: int | None):
    """A ``Problem`` for ``pattern`` from ``--grid``/``--seq``/``--heads``; grid may be None
    only for grid-free patterns (voxels), which the caller handles."""
    from ..dsl import Problem

    if grid_text is not None and seq is not None:
        raise InputError("'--seq'", "give either --grid or --seq, not both")
    if seq is not None:
        grid = (seq,)
    elif grid_text is not None:
        grid = parse_sizes(grid_text, "'--grid'", "a grid", "56x56, 4096 or 8x28x28")
    else:
        grid = None
    if heads is None:
        heads = default_heads(pattern)
    ctx = click.get_current_context(silent=True)
    if ctx is not None and grid is not None:  # where memory-budget errors point
        ctx.meta[SIZE_OPTION] = "'--seq'" if seq is not None else "'--grid'"
    with user_errors("'--grid'"):
        return Problem(grid=grid, heads=heads)


def require_cache_dir() -> None:
    """An ``InputError`` naming SPARSEFORGE_CACHE_DIR unless the cache directory can be written."""
    why = envvars.cache_dir_problem()
    if why is not None:
        raise InputError(None, why)


def problem_hint(problem) -> str:
    """The options that made ``problem``, for error messages."""
    grid = "x".join(map(str, problem.grid)) if problem.grid else "(none)"
    return f"--grid {grid} --heads {problem.heads}"


# ------------------------------------------------------------------------------------
# show
# ------------------------------------------------------------------------------------
ROUTING_SEED = 0


def display_repr(pattern) -> str:
    """``repr`` with a top-level PerHead's repeats folded: ``PerHead([a] * 4 + [b] * 4)``
    (still a DSL expression)."""
    from ..dsl import PerHead

    if not isinstance(pattern, PerHead):
        return repr(pattern)
    return "PerHead(" + " + ".join(f"[{p!r}]" + (f" * {n}" if n > 1 else "") for p, n in pattern.runs()) + ")"


def runtime_inputs(pattern, problem):
    """Inputs a content-dependent pattern reads, made up for a picture, and notes saying so.

    Routed: random q, k from a fixed seed. Scattered: every grid cell a voxel of batch 0.
    Grouped: the tokens cut into 4 contiguous groups (packed documents).
    """
    import torch

    inputs, notes = {}, []
    needs = pattern.inputs_needed()
    if "qk" in needs:
        gen = torch.Generator().manual_seed(ROUTING_SEED)
        shape = (1, problem.heads, problem.tokens, problem.head_dim)
        inputs["q"] = torch.randn(shape, generator=gen, dtype=torch.float64)
        inputs["k"] = torch.randn(shape, generator=gen, dtype=torch.float64)
        notes.append(f"routing on random q and k (seed {ROUTING_SEED}, head_dim {problem.head_dim}): "
                     "one example of a content-dependent mask")
    if "coords" in needs:
        axes = torch.meshgrid(*(torch.arange(s) for s in problem.grid), indexing="ij")
        cells = torch.stack([a.reshape(-1) for a in axes], dim=1)
        inputs["coords"] = torch.cat([torch.zeros(len(cells), 1, dtype=torch.long), cells], dim=1)
        notes.append(f"voxels: every cell of the {'x'.join(map(str, problem.grid))} grid is a voxel of batch 0 "
                     "(coords built from --grid)")
    if "groups" in needs:
        n = problem.tokens
        inputs["groups"] = (torch.arange(n) * min(4, n) // n)[None]
        notes.append(f"groups: the {n} tokens cut into {min(4, n)} contiguous groups of equal size "
                     "(one example of run-time group ids)")
    return inputs, notes


def group_label(pattern, heads: tuple[int, ...], total: int) -> str:
    """``heads 0-3``, with the heads' own pattern when a top-level PerHead gives it."""
    from .. import viz
    from ..dsl import PerHead

    text = viz.heads_label(heads)
    if len(heads) < total and isinstance(pattern, PerHead):
        text += f": {pattern.patterns[heads[0]]!r}"
    return text


def check_show_memory(pattern, problem, draw_mask: bool) -> None:
    """Refuse up front, as an ``InputError`` on the size option, what ``show`` could not hold
    within the memory budget: the inputs it makes up, the statistics' chunk of mask rows
    (``describe`` evaluates at least one query row of every head at a time), the routing
    layouts and the pictures. Nothing [H, N, N] is built unless N is small enough to draw."""
    from ..dsl import budget
    from ..dsl.semantics import CHUNK_ELEMENTS

    h, n = problem.heads, problem.tokens
    needs = pattern.inputs_needed()
    inputs = (2 * h * n * problem.head_dim * 8 if "qk" in needs else 0) + \
        (3 * n * (1 + problem.ndim) * 8 if "coords" in needs else 0) + (2 * n * 8 if "groups" in needs else 0)
    rows = budget.mask_rows_bytes(h, n, 1, CHUNK_ELEMENTS)
    routing = budget.routing_bytes(pattern, problem)
    pictures = h * n * (n if draw_mask else 1) * budget.MASK_ELEMENT_BYTES
    why = (f"grid {'x'.join(map(str, problem.grid))} ({n} tokens), {h} head{'s' if h != 1 else ''}: "
           f"{budget.format_bytes(rows)} to count the keys of "
           f"each query a chunk of rows at a time ({budget.MASK_ELEMENT_BYTES} bytes per mask entry)")
    for amount, what in ((inputs, "made-up inputs"), (routing, "routing"), (pictures, "pictures")):
        if amount >= 1 << 20:
            why += f", {budget.format_bytes(amount)} of {what}"
    try:
        budget.check("show", inputs + rows + routing + pictures, why, "use a smaller --grid or --seq")
    except budget.MemoryBudgetError as e:
        ctx = click.get_current_context(silent=True)
        raise InputError((ctx.meta.get(SIZE_OPTION) if ctx else None) or "'--grid'", str(e)) from None


def query_from_option(text: str | None, grid: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return tuple(s // 2 for s in grid)
    query = parse_sizes(text, "'--query'", "a grid position", ",".join("0" * len(grid)))
    if len(query) != len(grid):
        raise InputError("'--query'", f"{text!r} has {len(query)} coordinate{'s' if len(query) != 1 else ''} "
                                      f"but the grid {grid} has {len(grid)}")
    if any(c >= s for c, s in zip(query, grid)):
        raise InputError("'--query'", f"{text!r} is outside the grid {grid}")
    return query


@command(short_help="Describe a pattern and draw it.")
@pattern_argument
@problem_options
@click.option("--query", "query_text", default=None, metavar="I,J",
              help="Grid position of the query to draw [default: the grid centre].")
@click.option("--png", "png_path", type=click.Path(), default=None,
              help="Also write the pictures to this PNG (needs matplotlib: extra 'pictures').")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON on stdout, nothing else.")
def show(pattern: str, grid_text, seq, heads, query_text, png_path, as_json) -> None:
    """Describe PATTERN on a token grid and draw it.

    Prints density, keys per query (min/mean/max) and empty rows per head; draws the
    N x N mask when N <= 64 and, on the grid, the keys one query sees (a strip for 1-D,
    the slice through the query for 3-D), once per distinct head.

    \b
    Examples:
      sparseforge show "Neighborhood(7, dilation=2)" --grid 56x56 --query 0,0
      sparseforge show examples/patterns.py:maxvit_heads --grid 28x28 --heads 8 --png mix.png
      sparseforge show "Causal() & (SlidingWindow(16) | Sink(4))" --seq 64
    """
    import torch

    from .. import viz
    from ..dsl import describe
    from ..dsl.semantics import make_context, mask_rows

    pat = load_pattern_arg(pattern)
    problem = problem_from_options(pat, grid_text, seq, heads)
    if problem.grid is None:
        if "coords" in pat.inputs_needed():
            raise InputError("'--grid'", f"{pat!r} places voxels by coordinates; give --grid to draw it "
                                         "with every grid cell as a voxel of batch 0")
        raise InputError("'--grid'", "missing: give --grid (e.g. 56x56) or --seq N")
    query = query_from_option(query_text, problem.grid)
    if png_path is not None:
        from pathlib import Path
        target = Path(png_path)
        if target.is_dir():
            raise InputError("'--png'", f"{png_path!r} is a directory; give a file name such as pattern.png")
        if not target.resolve().parent.is_dir():
            raise InputError("'--png'", f"directory {str(target.resolve().parent)!r} does not exist")

    n = problem.tokens
    draw_mask = n <= (viz.PNG_MASK_MAX_TOKENS if png_path else viz.TEXT_MASK_MAX_TOKENS)
    check_show_memory(pat, problem, draw_mask)
    inputs, notes = runtime_inputs(pat, problem)
    q_index = viz.flat_index(query, problem.grid)
    with user_errors(f"'PATTERN' with {problem_hint(problem)}"):    # the pattern does not fit the problem
        ctx = make_context(pat, problem, **inputs)
        stats = describe(pat, problem, **inputs)
        query_keys = mask_rows(pat, ctx, torch.tensor([q_index]))[0, :, 0]        # [H, N]
        full = mask_rows(pat, ctx, torch.arange(n))[0] if draw_mask else None       # [H, N, N]

    def label(heads: tuple[int, ...]) -> str:
        return group_label(pat, heads, problem.heads)

    title = f"{display_repr(pat)} on grid {'x'.join(map(str, problem.grid))}, heads {problem.heads}"
    if png_path is not None:
        panels = [viz.Panel("mask", m, label(h)) for h, m in (viz.head_groups(full) if draw_mask else [])]
        panels += [viz.Panel("query", k, label(h)) for h, k in viz.head_groups(query_keys)]
        try:
            size = viz.render_png(png_path, title=title, grid=problem.grid, query=query, panels=panels, notes=notes)
        except viz.MissingExtraError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise InputError("'--png'", f"cannot write {png_path!r}: {e.strerror or e}") from None
    if as_json:
        click.echo(json.dumps(stats.as_dict(), indent=2))
        return

    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"{title} (N={n})", style="bold", markup=False, soft_wrap=True)
    for note in notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)
    console.print(viz.stats_table(stats))
    if draw_mask and n <= viz.TEXT_MASK_MAX_TOKENS:
        for heads_, m in viz.head_groups(full):
            console.print(f"\nmask ({label(heads_)}): rows are queries, columns keys; '>' marks query "
                          f"{viz.format_query(query)}", markup=False,
                          soft_wrap=True)
            console.print(viz.rich_picture(viz.text_mask(m, q_index)), soft_wrap=True)
    for heads_, keys in viz.head_groups(query_keys):
        picture, caption = viz.text_query(keys, problem.grid, query)
        count = int(keys.sum())
        console.print(f"\nkeys seen by query {viz.format_query(query)} ({label(heads_)}): "
                      f"{count} key{'s' if count != 1 else ''}" + (f"; {caption}" if caption else ""),
                      markup=False, soft_wrap=True)
        console.print(viz.rich_picture(picture), soft_wrap=True)
    console.print(f"\n{viz.LEGEND}", markup=False, soft_wrap=True)
    if png_path is not None:
        console.print(f"wrote {png_path} ({size[0]}x{size[1]} pixels)", markup=False, soft_wrap=True)


# ------------------------------------------------------------------------------------
# env
# ------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    """Versions, the CUDA device and the cache directory (what ``sparseforge env`` prints)."""
    import torch

    from .. import __version__

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        cuda = f"{torch.cuda.get_device_name(0)} (sm_{major}{minor}, CUDA {torch.version.cuda})"
    else:
        cuda = "none"
    return {
        "sparseforge": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_device": cuda,
        "cache_dir": str(envvars.cache_dir()),
        "env": envvars.current(),
    }


@command(short_help="Print versions, the GPU and the cache directory.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
def env(as_json: bool) -> None:
    """Print the versions of sparseforge, torch, triton and Python, the CUDA device (or
    'none'), the cache directory and sparseforge's environment variables."""
    info = environment()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in info.items():
        if key != "env":
            table.add_row(key, str(value))
    for name, value in info["env"].items():
        table.add_row(name, "(unset)" if value is None else value)
    Console(highlight=False, soft_wrap=True).print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
