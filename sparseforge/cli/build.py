"""``sparseforge compile | check | bench | cache``: the commands that build, verify, time and
clean compiled attentions. Registered on ``cli.main`` when ``cli`` is imported.

stdout carries results only (a table, or JSON with ``--json``); logs and progress go to
stderr (a rich progress line on a terminal, nothing otherwise).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import click

from .. import envvars
from .main import InputError, PositiveInt, command, load_pattern_arg, main, parse_sizes, problem_from_options, \
    problem_options, require_cache_dir, user_errors

DTYPE_CHOICES = ("fp16", "bf16", "fp32")


# ------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------
def kernel_problem_options(f):
    """The problem options plus what kernels need: head dim, dtype and KV heads."""
    f = click.option("--kv-heads", type=PositiveInt(), default=None, metavar="H",
                     help="Key/value heads (GQA/MQA), dividing --heads [default: --heads].")(f)
    f = click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="bf16", show_default=True,
                     help="Input dtype of q, k, v.")(f)
    f = click.option("--head-dim", type=PositiveInt(), default=64, show_default=True, metavar="D",
                     help="Head dimension.")(f)
    return problem_options(f)


def kv_grid_option(f):
    """``--kv-grid``: the keys' grid when it is not the queries' (cross attention, decode)."""
    return click.option("--kv-grid", "kv_grid_text", default=None, metavar="SxS",
                        help="The keys' token grid when it is not --grid (cross attention; 1-D: decode, the "
                             "queries are the last positions), sizes joined by 'x': 4096, 28x28 [default: --grid].")(f)


def kernel_problem(pattern, grid_text, seq, heads, head_dim, dtype, kv_heads, kv_grid_text=None):
    from ..dsl import Problem

    base = problem_from_options(pattern, grid_text, seq, heads)
    if base.grid is None:
        raise InputError("'--grid'", "missing: give --grid (e.g. 56x56) or --seq N")
    kv_grid = None
    if kv_grid_text is not None:
        kv_grid = parse_sizes(kv_grid_text, "'--kv-grid'", "a grid", "28x28 or 4096")
        with user_errors("'--kv-grid'"):
            Problem(grid=base.grid, kv_grid=kv_grid)
    with user_errors("'--kv-heads'" if kv_heads is not None else "'--head-dim'"):
        return Problem(grid=base.grid, heads=base.heads, head_dim=head_dim, dtype=dtype,
                       kv_heads=base.heads if kv_heads is None else kv_heads, kv_grid=kv_grid)


def _refuse_grouped(pattern) -> None:
    """Grouped patterns compile in Python only (``runtime.grouped``): no build directory or bench yet."""
    if "groups" in pattern.inputs_needed():
        from ..runtime.compiled import UnsupportedPatternError

        raise UnsupportedPatternError(f"{pattern!r} reads group ids at call time and has no build directory or "
                                      "bench support yet; use sparseforge.compile(...)(q, k, v, groups=ids) in Python")


def check_out_dir(out: Path, option: str = "'--out'") -> None:
    """Refuse up front, before minutes of compiling, a build directory that cannot be written:
    a file, a non-empty directory or a symbolic link that holds no build (``write_build``
    replaces only builds and empty directories, and judges the rest itself), or a place where
    nothing can be created."""
    value = str(out)
    expected = "expected a new or empty directory, or an existing build"
    if out.is_symlink():
        if not (out / "manifest.json").is_file():  # a build is a link to its current version
            raise InputError(option, f"{value!r} is a symbolic link to something that is not a sparseforge build; "
                                     f"{expected} (a link of yours is never replaced)")
    elif out.exists() and not out.is_dir():
        raise InputError(option, f"{value!r} is a file; {expected}")
    elif out.is_dir():
        try:
            entries = [p.name for p in out.iterdir()]
        except OSError as e:
            raise InputError(option, f"{value!r} cannot be read ({e.strerror or e}); {expected}") from None
        if entries and "manifest.json" not in entries:
            raise InputError(option, f"{value!r} is a non-empty directory that is not a sparseforge build; {expected} "
                                     "(remove it or choose another)")
    why = envvars.unwritable_reason(out.parent if out.parent != out else out)
    if why is not None:
        raise InputError(option, f"{value!r}: {why}; expected a place where a directory can be written")


def tile_option(name: str):
    return click.option(f"--{name}", f"{name.replace('-', '_')}_text", default=None, metavar="AxB",
                        help=f"{'Query' if name == 'q-tile' else 'Key'} tile extents per grid dimension, "
                             "e.g. 8x16 [default: chosen per grid, or by --autotune].")


def tile_from_text(text: str | None, option: str, ndim: int):
    if text is None:
        return None
    tile = parse_sizes(text, option, "a tile shape", "8x16")
    if len(tile) != ndim or any(t < 1 for t in tile):
        raise InputError(option, f"{text!r} needs {ndim} positive extent(s), one per grid dimension")
    return tile


@contextlib.contextmanager
def progress_reporter(quiet: bool):
    """A ``say(text, done=None, total=None)`` callable: a rich progress bar on a terminal's
    stderr, nothing otherwise (logs never go to stdout)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield lambda _text, _done=None, _total=None: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def say(text, done=None, total=None):
            bar.update(task, description=text, completed=done, total=total)
        yield say


def log(text: str) -> None:
    click.echo(text, err=True)


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:  # files and pipes get long lines (rich would cut at 80 columns)
        console = Console(highlight=False, soft_wrap=True, width=160)
    console.print(title, style="bold", markup=False)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


# ------------------------------------------------------------------------------------
# compile
# ------------------------------------------------------------------------------------
@command(name="compile", short_help="Compile a pattern into a build directory.")
@click.argument("pattern", metavar="PATTERN")
@kernel_problem_options
@kv_grid_option
@tile_option("q-tile")
@tile_option("k-tile")
@click.option("--autotune", is_flag=True, help="Choose tiles and launches: timed on a GPU of the target, "
              "predicted by the cost model without one (said so in the output).")
@click.option("--target", default=None, metavar="sm_XX",
              help="GPU target of the ahead-of-time artifacts and of tuning: sm_80, sm_90, sm_100 "
                   "[default: this machine's GPU, else sm_90].")
@click.option("--batch", type=PositiveInt(), default=None,
              help="The batch size --autotune tunes for (its power-of-two bucket keys the tuning database) "
                   "[default: 1].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Build directory to write [default: <cache dir>/builds/<op name>].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def compile_cmd(pattern, grid_text, seq, heads, head_dim, dtype, kv_heads, kv_grid_text, q_tile_text, k_tile_text,
                autotune, target, batch, out_dir, as_json) -> None:
    """Compile PATTERN for a problem into a build directory: kernel sources, the chosen
    config, ahead-of-time PTX/cubin for the target and a manifest with the sha256 of every
    file. Works without a GPU (cross-compiles for --target). --kv-grid (keys on a grid of
    their own) is checked against PATTERN, but its Triton kernels do not exist yet: the
    build is refused (run it with sparseforge.compile on CPU tensors).

    \b
    Examples:
      sparseforge compile examples/patterns.py:neighborhood_2d --grid 56x56 --heads 8 \\
          --head-dim 64 --dtype bf16 --autotune --out build/na2d
      sparseforge compile "StridedShards(64, 16, 8)" --seq 32768 --heads 32 --head-dim 128 \\
          --target sm_90 --out build/s2
    """
    from ..autotune import resolve_target, tune
    from ..backends.aot import parse_target
    from ..codegen.config import KernelConfig
    from ..runtime.build import save
    from ..api import compile as sf_compile

    from ..runtime.inputs import check_triton_problem

    pat = load_pattern_arg(pattern)
    problem = kernel_problem(pat, grid_text, seq, heads, head_dim, dtype, kv_heads, kv_grid_text)
    if problem.is_cross:
        from ..dsl.semantics import check_cross
        from ..runtime.ops import refuse_cross_on

        with user_errors(f"'--kv-grid' ({problem!r})"):
            check_cross(pat, problem)
            refuse_cross_on("triton", "a build directory holds the generated Triton kernels")
    with user_errors("'--head-dim'" if problem.head_dim != 64 else "'--dtype'"):
        check_triton_problem(problem, "triton")  # a build holds GPU kernels
    q_tile = tile_from_text(q_tile_text, "'--q-tile'", problem.ndim)
    k_tile = tile_from_text(k_tile_text, "'--k-tile'", problem.ndim)
    if autotune and (q_tile or k_tile):
        raise InputError("'--autotune'", "chooses the tiles itself; drop --q-tile/--k-tile or --autotune")
    if batch is not None and not autotune:
        raise InputError("'--batch'", "is the batch size --autotune tunes for; add --autotune or drop --batch")
    with user_errors("'--target'"):
        cap = resolve_target(target) if target is None else parse_target(target)
    require_cache_dir()  # kernel sources, the tuning database and the default build go there
    if out_dir is not None:
        check_out_dir(Path(out_dir))
    t0 = time.perf_counter()
    with progress_reporter(as_json) as say:
        tuning = None
        with user_errors(f"'PATTERN' on {problem!r}"):
            if autotune:
                say("autotuning", 0, None)
                tuning = tune(pat, problem, batch=batch or 1, target=f"sm_{cap}", progress=say)
                config = tuning.config
            else:
                config = KernelConfig(q_tile=q_tile, k_tile=k_tile)
            _refuse_grouped(pat)
            attn = sf_compile(pat, problem, config=config)
        attn.tuning = tuning
        out = Path(out_dir) if out_dir else envvars.cache_dir() / "builds" / attn.name
        with user_errors("'--out'", paths=True):
            path = save(attn, out, targets=(f"sm_{cap}",), progress=say)
    from ..runtime.builddir import read_build

    build = read_build(path)
    resources = json.loads(build.read_text(f"aot/sm_{cap}/resources.json"))
    result = dict(build_dir=str(path), name=attn.name, pattern=repr(pat), problem=repr(problem), target=f"sm_{cap}",
                  config=attn.config.as_dict(), loop_bounds=attn.schedule.loop_bounds,
                  tile_efficiency=attn.schedule.tile_efficiency, resources=resources,
                  tuning=None if tuning is None else dict(basis=tuning.basis, measured=tuning.measured,
                                                           metric=tuning.metric, cached=tuning.cached,
                                                           device=tuning.device_name, batch=tuning.batch),
                  seconds=time.perf_counter() - t0)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rows = [("name", attn.name), ("op", f"torch.ops.sparseforge.attention (kernel {attn.kernel.key!r})"),
            ("problem", repr(problem)),
            ("schedule", attn.schedule.summary().split("\n", 1)[1].strip().replace("\n  ", "; ")),
            ("config", attn.config.describe())]
    if tuning is not None:
        unit = "ms" if tuning.measured else "µs (predicted)"
        rows.append(("autotune", f"{tuning.basis}{'; from the tuning database' if tuning.cached else ''}: "
                                 f"{tuning.metric:.4g} {unit} on {tuning.device_name}, batch bucket {tuning.batch}"))
    for name, r in resources.items():
        rows.append((f"{name} sm_{cap}", f"{r['registers']} registers, {r['spills']} B spills, "
                                         f"{r['shared_bytes']} B shared, {r['tensor_core']}"))
    rows.append(("build", f"{path} ({len(build.files)} files, {result['seconds']:.1f} s)"))
    print_table(f"compiled {pat!r}", rows)


# ------------------------------------------------------------------------------------
# check
# ------------------------------------------------------------------------------------
@command(short_help="Check a build's numerics against the float64 reference.")
@click.argument("build_dir", type=click.Path(file_okay=False), metavar="DIR")
@click.option("--backend", type=click.Choice(["auto", "triton", "cpu", "interpret"]), default="auto",
              show_default=True, help="Executor: auto = Triton kernels on a GPU, the CPU executor without one.")
@click.option("--batch", type=PositiveInt(), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def check(build_dir, backend, batch, seed, as_json) -> None:
    """Verify the build in DIR (hashes), run it on random inputs and compare the output,
    LSE and gradients with the float64 reference. Exits 1 if an error exceeds the dtype's
    tolerance."""
    import torch

    from ..runtime.build import load
    from ..runtime.check import check_numerics

    with user_errors("'DIR'"):
        attn = load(build_dir, backend=None if backend == "auto" else backend)
    device = "cuda" if (backend in ("auto", "triton") and torch.cuda.is_available()) else "cpu"
    if backend == "triton" and device != "cuda":
        raise InputError("'--backend'", "triton needs a CUDA GPU; this machine has none (use cpu or interpret)")
    log(f"checking {attn.name} on {device} ({'Triton kernels' if device == 'cuda' or backend == 'interpret' else 'CPU executor'})")
    with user_errors(f"'DIR' ({attn.problem!r})"):
        result = check_numerics(attn, batch=batch, seed=seed, device=device)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        rows = [(name, f"{err:.2e} (tolerance {result.tolerances[name]:.1e})") for name, err in result.errors.items()]
        rows += [("errors", f"largest row error; tolerance c * eps * sqrt(terms summed) ({result.dtype})"),
                 ("executor", f"{'Triton kernels' if result.device.startswith('cuda') or backend == 'interpret' else 'CPU executor'} on {result.device}"),
                 ("verdict", "PASS" if result.passed else "FAIL")]
        print_table(f"relative error vs float64 reference: {attn.name}", rows)
    if not result.passed:
        sys.exit(1)  # the table (or JSON) above says which output failed


# ------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------
def _median_ms(fn, repeat: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _option_name(param: str) -> str:
    return {"target": "DIR|PATTERN", "grid_text": "--grid"}.get(param, "--" + param.replace("_", "-"))


def _bench_suite(*, cpu: bool, only: str | None, repeat: int, as_json: bool, out_path, plot_path) -> None:
    import torch

    from ..atomic import write_atomic
    from ..bench import suite
    with user_errors("'--only'"):
        suite.select(only)
    if not cpu and not torch.cuda.is_available():
        raise InputError("'--suite'", "no CUDA device: use --cpu (the GPU suite times full-size problems "
                                      "with triton.testing.do_bench)")
    command = "sparseforge " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "sparseforge" else \
        " ".join(["sparseforge bench --suite"] + (["--cpu"] if cpu else []) + ([f"--only {only}"] if only else []))
    result = suite.run_suite(only, cpu=cpu, repeat=repeat, command=command)
    if out_path:
        with user_errors("'--out'", paths=True):
            write_atomic(out_path, json.dumps(result, indent=1) + "\n")
        log(f"wrote {out_path}")
    if plot_path:
        with user_errors("'--plot'", paths=True):
            suite.plot(result, plot_path)
        log(f"wrote {plot_path}")
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    meta = result["meta"]
    print_table(f"sparseforge benchmark suite, {meta['mode']} ({meta['device']}), median of {repeat}",
                suite.table_rows(result))


@command(short_help="Time a compiled op against dense SDPA and FlexAttention; --suite: the benchmark suite.")
@click.argument("target", metavar="DIR|PATTERN", required=False)
@kernel_problem_options
@click.option("--batch", type=PositiveInt(), default=1, show_default=True)
@click.option("--repeat", type=PositiveInt(), default=None,
              help="Timed runs per method [default: 10; 3 with --suite].")
@click.option("--backward/--no-backward", default=False, help="Time forward + backward.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--suite", is_flag=True, help="Run the benchmark suite (sparseforge.bench.suite) instead of one op.")
@click.option("--cpu", is_flag=True, help="With --suite: the scaled-down CPU suite (exact tile counts, build, "
              "compile and CPU op times) [default: full size on a CUDA device].")
@click.option("--only", default=None, metavar="P1,P4", help="With --suite: only these problem ids.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="With --suite: write the result JSON here (atomically).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="With --suite: draw the speedup per problem into this PNG.")
def bench(target, grid_text, seq, heads, head_dim, dtype, kv_heads, batch, repeat, backward, as_json, suite, cpu,
          only, out_path, plot_path) -> None:
    """Time the compiled op of a build DIR (or of PATTERN on the given problem) against
    dense SDPA with the same mask and FlexAttention with a block mask from it. Median
    wall time of --repeat runs on this machine (CUDA if present). A quick look; the
    benchmark suite is --suite.

    \b
    --suite runs every problem of the benchmark suite (sparseforge.bench) against its peers:
      sparseforge bench --suite --cpu --only P1,P4 --out results.json --plot results.png
    Without --cpu it needs a CUDA device (full-size problems, do_bench timings)."""
    if suite:
        ctx = click.get_current_context()
        extra = [name for name in ("target", "grid_text", "seq", "heads", "head_dim", "dtype", "kv_heads", "batch",
                                   "backward")
                 if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
        if extra:
            raise InputError("'--suite'", f"runs its own problems; drop {', '.join(_option_name(e) for e in extra)}")
        _bench_suite(cpu=cpu, only=only, repeat=repeat or 3, as_json=as_json, out_path=out_path,
                     plot_path=plot_path)
        return
    for flag, value in (("--cpu", cpu), ("--only", only), ("--out", out_path), ("--plot", plot_path)):
        if value:
            raise InputError(f"'{flag}'", "belongs to the suite; add --suite")
    if target is None:
        raise InputError("'DIR|PATTERN'", "missing: give a build directory or a pattern, or use --suite")
    repeat = repeat or 10
    import torch

    from ..dsl import dense_mask
    from ..runtime.build import load
    from ..api import compile as sf_compile

    require_cache_dir()
    if Path(target).is_dir():
        with user_errors("'DIR'"):
            attn = load(target)
    else:
        pat = load_pattern_arg(target)
        problem = kernel_problem(pat, grid_text, seq, heads, head_dim, dtype, kv_heads)
        with user_errors(f"'PATTERN' on {problem!r}"):
            _refuse_grouped(pat)
            attn = sf_compile(pat, problem)
    problem = attn.problem
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)

    def rand(h):
        return torch.randn((batch, h, problem.tokens, problem.head_dim), generator=gen).to(device, problem.dtype)
    q, k, v = rand(problem.heads), rand(problem.kv_heads), rand(problem.kv_heads)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    group = problem.heads // problem.kv_heads
    mask = dense_mask(attn.pattern, problem).to(device)        # [H or 1, N, N]
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def run(forward):
        def step():
            out = forward()
            if backward:
                out.float().sum().backward()
        return step
    methods = {"sparseforge": run(lambda: attn(q, k, v)),
               "sdpa (dense mask)": run(lambda: torch.nn.functional.scaled_dot_product_attention(
                   q, k_full, v_full, attn_mask=mask[None]))}
    notes = []
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            return mask[h if mask.shape[0] > 1 else 0, q_idx, kv_idx]
        block_mask = create_block_mask(mask_mod, None, problem.heads if mask.shape[0] > 1 else None,
                                       problem.tokens, problem.tokens, device=device)
        if device.type == "cuda":
            flex = torch.compile(flex_attention)
        else:
            import warnings

            notes.append("flex_attention runs unfused (eager) on CPU")

            def flex(*args, **kwargs):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    return flex_attention(*args, **kwargs)
        methods["flex_attention"] = run(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1))
    except Exception as exc:  # noqa: BLE001 - FlexAttention is optional; say why it is missing
        notes.append(f"flex_attention unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    results = {}
    for name, fn in methods.items():
        log(f"timing {name}")
        try:
            results[name] = _median_ms(fn, repeat, sync)
        except Exception as exc:  # noqa: BLE001 - report the method as failed, keep the others
            notes.append(f"{name} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    out = dict(name=attn.name, problem=repr(problem), device=torch.cuda.get_device_name() if device.type == "cuda"
               else "cpu", batch=batch, backward=backward, repeat=repeat, median_ms=results, notes=notes,
               tile_efficiency=attn.schedule.tile_efficiency)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    rows = [(name, f"{ms:.3f} ms") for name, ms in results.items()] + [("note", n) for n in notes]
    print_table(f"{attn.name} on {out['device']}, batch {batch}, "
                f"{'forward + backward' if backward else 'forward'}, median of {repeat}", rows)


# ------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------
CACHE_PARTS = {"kernels": "generated kernel sources", "builds": "default build directories",
               "tuning": "the tuning database"}


def _cache_parts() -> dict[str, list[Path]]:
    from ..autotune.db import default_db_path

    root = envvars.cache_dir()
    db = default_db_path()
    return {"kernels": [root / "kernels"], "builds": [root / "builds"],
            "tuning": sorted(db.parent.glob(db.name + "*"))}  # the file, its -wal/-shm/.lock, moved-aside copies


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


@main.group(short_help="List or clear the cache.")
def cache() -> None:
    """The cache directory: generated kernels, default builds and the tuning database
    (``$SPARSEFORGE_CACHE_DIR`` overrides its place)."""


@cache.command(name="list", short_help="List what the cache holds.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
def cache_list(as_json: bool) -> None:
    """List the cache: kernels and builds per op name, and the tuning database's entries."""
    with user_errors():
        from ..autotune.db import TuningDB, default_db_path

        root = envvars.cache_dir()
        parts = _cache_parts()
        kernels = sorted(p.name for p in (root / "kernels").iterdir()) if (root / "kernels").is_dir() else []
        builds = sorted(p.name for p in (root / "builds").iterdir()
                        if not p.name.startswith(".")) if (root / "builds").is_dir() else []  # not versions, locks
        entries = TuningDB().entries() if default_db_path().exists() else []
        info = dict(cache_dir=str(root), bytes={k: sum(_size(p) for p in v) for k, v in parts.items()},
                    kernels=kernels, builds=builds,
                    tuning=[dict(pattern_fingerprint=k.pattern_fingerprint[:16], problem=k.problem, target=k.target,
                                 device=k.device_name, measured=r.measured, metric=r.metric, kernel=r.kernel_name,
                                 config=r.config) for k, r in entries])
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    rows = [("cache dir", info["cache_dir"])]
    rows += [(part, f"{len(info[part]) if part != 'tuning' else len(entries)} entries, {info['bytes'][part]} bytes")
             for part in CACHE_PARTS]
    rows += [("kernel", name) for name in kernels] + [("build", name) for name in builds]
    rows += [("tuned", f"{t['kernel']} {t['target']} {'measured' if t['measured'] else 'predicted'} "
                       f"{t['metric']:.4g}") for t in info["tuning"]]
    print_table("sparseforge cache", rows)


@cache.command(name="clear", short_help="Delete cached kernels, builds and tuning results.")
@click.option("--only", type=click.Choice(sorted(CACHE_PARTS)), multiple=True,
              help="Clear only this part (repeatable) [default: everything].")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON on stdout.")
def cache_clear(only, as_json: bool) -> None:
    """Delete the cache's contents (kernels, default builds, tuning database). Builds
    written elsewhere with --out are never touched."""
    with user_errors():
        removed = {}
        for part, paths in _cache_parts().items():
            if only and part not in only:
                continue
            removed[part] = sum(_size(p) for p in paths)
            for p in paths:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    if as_json:
        click.echo(json.dumps(dict(cache_dir=str(envvars.cache_dir()), removed_bytes=removed), indent=2))
    else:
        click.echo(f"cleared {', '.join(f'{k} ({v} bytes)' for k, v in removed.items())} from {envvars.cache_dir()}",
                   file=sys.stdout)
