"""Pictures of patterns: text for terminals, PNG through matplotlib (an optional extra).

Everything here works on plain values — bool mask tensors, grids, ``PatternStats`` —
never on click objects, so the CLI stays thin and other tools can draw the same pictures.

Two pictures are drawn:

- the ``[N, N]`` mask (rows are queries, columns keys) for small ``N``;
- the keys one query sees, laid out on the token grid: a strip for 1-D grids, the grid
  itself for 2-D, the slice through the query for 3-D. This is the picture to reason with.

Text characters: ``#`` a key the query sees, ``.`` a key it does not, ``@`` the query
itself when it sees itself and ``O`` when it does not.
"""
from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .atomic import write_atomic

KEY, EMPTY, QUERY_SEEN, QUERY_UNSEEN = "#", ".", "@", "O"
LEGEND = f"{KEY} key the query sees   {EMPTY} key it does not   {QUERY_SEEN} the query (sees itself)   " \
         f"{QUERY_UNSEEN} the query (does not see itself)"

TEXT_MASK_MAX_TOKENS = 64     # largest N whose N x N mask is drawn as text
PNG_MASK_MAX_TOKENS = 1024    # largest N whose N x N mask is drawn in a PNG
TEXT_MAX_WIDTH = 120          # characters per text line; wider views are cropped around the query
TEXT_MAX_ROWS = 64            # lines per text grid view; taller views are cropped around the query

# PNG layout: fixed sizes so the image size follows from the panel count alone.
PNG_DPI = 100
PNG_PANEL_IN = 3.2            # each panel is a square of this many inches
PNG_TITLE_IN = 1.1            # band at the top: title (at most 3 lines), notes, legend, panel titles
PNG_STRIP_IN = 1.3            # height of a row of 1-D query strips
PNG_MAX_COLUMNS = 4
PNG_MASK_PIXELS = 240         # a larger mask is averaged down to this many pixels per side
COLOR_EMPTY, COLOR_KEY, COLOR_QUERY, COLOR_QUERY_UNSEEN = "#eeeeee", "#2f5f9e", "#d62728", "#ff9f1c"


class MissingExtraError(RuntimeError):
    """An optional dependency (an extra of the sparseforge package) is not installed."""


# ------------------------------------------------------------------------------------
# Heads and coordinates
# ------------------------------------------------------------------------------------
def head_groups(masks: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Group heads with identical masks: ``masks`` is [H, ...]; returns
    ``[(heads, mask), ...]`` in order of each group's first head."""
    groups: list[tuple[list[int], torch.Tensor]] = []
    for h in range(masks.shape[0]):
        for heads, m in groups:
            if torch.equal(m, masks[h]):
                heads.append(h)
                break
        else:
            groups.append(([h], masks[h]))
    return [(tuple(heads), m) for heads, m in groups]


def heads_label(heads: Sequence[int]) -> str:
    """``head 3``, ``heads 0-3`` or ``heads 0, 2, 5``."""
    heads = list(heads)
    if len(heads) == 1:
        return f"head {heads[0]}"
    if heads == list(range(heads[0], heads[-1] + 1)):
        return f"heads {heads[0]}-{heads[-1]}"
    return "heads " + ", ".join(map(str, heads))


def format_query(query: Sequence[int]) -> str:
    """``16`` on a 1-D grid, ``(14, 14)`` on N-D grids."""
    return str(query[0]) if len(query) == 1 else "(" + ", ".join(map(str, query)) + ")"


def flat_index(coord: Sequence[int], grid: Sequence[int]) -> int:
    """Row-major flat index of ``coord`` on ``grid``."""
    index = 0
    for c, s in zip(coord, grid):
        index = index * s + c
    return index


# ------------------------------------------------------------------------------------
# The view of one query's keys on the grid
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridView:
    """A 2-D window onto the keys one query sees.

    cells:   bool [rows, cols], the keys seen inside the window.
    query:   (row, col) of the query inside the window, or None when it lies outside.
    origin:  grid coordinates of cell (0, 0) along the two shown dimensions.
    axes:    names of the shown dimensions (``("", "dim 0")`` for a 1-D strip).
    caption: what the window shows: the slice, the crop, keys seen outside the window.
    """

    cells: torch.Tensor
    query: tuple[int, int] | None
    origin: tuple[int, int]
    axes: tuple[str, str]
    caption: str


def _window(center: int, length: int, size: int) -> tuple[int, int]:
    size = min(size, length)
    start = min(max(center - size // 2, 0), length - size)
    return start, start + size


def query_view(keys: torch.Tensor, grid: Sequence[int], query: Sequence[int], *,
               max_rows: int | None = None, max_cols: int | None = None) -> GridView:
    """The keys ``keys`` (bool [N]) seen by the query at ``query`` on ``grid``, as a 2-D
    window: the whole strip (1-D) or grid (2-D), or the slice of a 3-D grid through the
    query's first coordinate; cropped around the query to ``max_rows`` x ``max_cols``."""
    grid, query = tuple(grid), tuple(query)
    if len(grid) != len(query) or not 1 <= len(grid) <= 3:
        raise ValueError(f"query {query} does not match grid {grid} (1 to 3 dimensions)")
    cube = keys.reshape(grid)
    notes = []
    if len(grid) == 1:
        plane, (qr, qc), axes = cube[None, :], (0, query[0]), ("", "dim 0")
    elif len(grid) == 2:
        plane, (qr, qc), axes = cube, query, ("dim 0", "dim 1")
    else:
        plane, (qr, qc), axes = cube[query[0]], query[1:], ("dim 1", "dim 2")
        notes.append(f"slice dim 0 = {query[0]} of {grid[0]}")
    r0, r1 = _window(qr, plane.shape[0], max_rows or plane.shape[0])
    c0, c1 = _window(qc, plane.shape[1], max_cols or plane.shape[1])
    if (r1 - r0, c1 - c0) != tuple(plane.shape):
        shown = (f"rows {r0}-{r1 - 1}, " if plane.shape[0] > 1 else "") + f"columns {c0}-{c1 - 1}"
        notes.append(f"cropped to {shown}")
    cells = plane[r0:r1, c0:c1]
    hidden = int(keys.sum()) - int(cells.sum())
    if hidden:
        notes.append(f"{hidden} more key{'s' if hidden != 1 else ''} outside this view")
    inside = r0 <= qr < r1 and c0 <= qc < c1
    return GridView(cells, (qr - r0, qc - c0) if inside else None, (r0, c0), axes, "; ".join(notes))


def _cell_text(seen: bool, is_query: bool) -> str:
    if is_query:
        return QUERY_SEEN if seen else QUERY_UNSEEN
    return KEY if seen else EMPTY


def _join(cells: Sequence[str], spaced: bool) -> str:
    return (" " if spaced else "").join(cells)


def text_view(view: GridView) -> str:
    """A ``GridView`` drawn with characters, one line per row (caption not included)."""
    rows, cols = view.cells.shape
    spaced = 2 * cols - 1 <= TEXT_MAX_WIDTH
    cells = view.cells.tolist()
    return "\n".join(
        _join([_cell_text(cells[r][c], view.query == (r, c)) for c in range(cols)], spaced)
        for r in range(rows))


def text_query(keys: torch.Tensor, grid: Sequence[int], query: Sequence[int]) -> tuple[str, str]:
    """(picture, caption) of the keys one query sees, sized for a terminal."""
    cols = TEXT_MAX_WIDTH if 2 * grid[-1] - 1 > TEXT_MAX_WIDTH else None
    view = query_view(keys, grid, query, max_rows=TEXT_MAX_ROWS, max_cols=cols)
    return text_view(view), view.caption


def text_mask(mask: torch.Tensor, query_index: int | None = None) -> str:
    """The [N, N] mask drawn with characters: one line per query, one character per key;
    the line of ``query_index`` starts with ``>``."""
    n = mask.shape[-1]
    spaced = 2 * n - 1 <= TEXT_MAX_WIDTH
    rows = mask.tolist()
    return "\n".join(("> " if i == query_index else "  ") + _join([KEY if x else EMPTY for x in row], spaced)
                     for i, row in enumerate(rows))


def rich_picture(text: str):
    """A text picture as a ``rich.text.Text``, keys and the query coloured."""
    from rich.text import Text

    out = Text(text)
    out.highlight_regex(r"#", "bold blue")
    out.highlight_regex(r"[@O]", "bold red")
    return out


def stats_table(stats):
    """A ``rich`` table of a ``PatternStats``: density, keys per query and empty rows per head."""
    from rich.table import Table

    table = Table()
    table.add_column("head", justify="right")
    table.add_column("density", justify="right")
    table.add_column("keys/query min", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("max", justify="right")
    table.add_column("empty rows", justify="right")
    for h in stats.heads:
        table.add_row(str(h.head), f"{h.density:.4g}", str(h.keys_min), f"{h.keys_mean:.2f}",
                      str(h.keys_max), str(h.empty_rows))
    if len(stats.heads) > 1:
        mean = sum(h.keys_mean for h in stats.heads) / len(stats.heads)
        table.add_row("all", f"{stats.density:.4g}", str(min(h.keys_min for h in stats.heads)), f"{mean:.2f}",
                      str(max(h.keys_max for h in stats.heads)), str(stats.empty_rows), style="bold")
    return table


# ------------------------------------------------------------------------------------
# PNG
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Panel:
    """One picture in a PNG: a mask ([N, N]) or a query's keys ([N]) for some heads."""

    kind: str                  # "mask" or "query"
    data: torch.Tensor
    label: str


def png_layout(n_mask_panels: int, n_query_panels: int, ndim: int) -> tuple[int, list[float]]:
    """(columns, row heights in inches) of the panel grid ``render_png`` draws: masks first,
    then query views, up to ``PNG_MAX_COLUMNS`` a row; a 1-D query view is a short strip."""
    cols = max(1, min(PNG_MAX_COLUMNS, max(n_mask_panels, n_query_panels)))
    view_in = PNG_PANEL_IN if ndim > 1 else PNG_STRIP_IN
    return cols, ([PNG_PANEL_IN] * math.ceil(n_mask_panels / cols) + [view_in] * math.ceil(n_query_panels / cols))


def png_size(n_mask_panels: int, n_query_panels: int, ndim: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG ``render_png`` writes for these panels."""
    cols, heights = png_layout(n_mask_panels, n_query_panels, ndim)
    return round(cols * PNG_PANEL_IN * PNG_DPI), round((sum(heights) + PNG_TITLE_IN) * PNG_DPI)


def _matplotlib():
    try:
        from matplotlib.colors import LinearSegmentedColormap, ListedColormap
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingExtraError(
            "writing a PNG needs matplotlib, sparseforge's optional extra 'pictures': "
            "pip install 'sparseforge[pictures]'") from e
    return Figure, LinearSegmentedColormap, ListedColormap


def render_png(path: str | os.PathLike, *, title: str, grid: Sequence[int], query: Sequence[int],
               panels: Sequence[Panel], notes: Sequence[str] = ()) -> tuple[int, int]:
    """Write ``panels`` (see ``png_layout``) under ``title`` and ``notes`` to a PNG at
    ``path`` — atomically: a temporary file renamed into place. Returns (width, height)."""
    Figure, LinearSegmentedColormap, ListedColormap = _matplotlib()
    masks = [p for p in panels if p.kind == "mask"]
    views = [p for p in panels if p.kind == "query"]
    cols, heights = png_layout(len(masks), len(views), len(grid))
    width_in, height_in = cols * PNG_PANEL_IN, sum(heights) + PNG_TITLE_IN
    fig = Figure(figsize=(width_in, height_in), dpi=PNG_DPI)
    chars = max(30, int(width_in * 12))      # monospace 9 pt: about 13 characters per inch
    lines = textwrap.wrap(title, chars, break_on_hyphens=False)
    if len(lines) > 3:
        lines = lines[:3]
        lines[-1] = lines[-1][:chars - 1] + "…"
    legend = "blue: keys the query sees; red: the query (orange: the query does not see itself)"
    foot = textwrap.wrap("; ".join([*notes, legend]), int(chars * 1.3))
    fig.text(0.5, 1 - 0.06 / height_in, "\n".join(lines), ha="center", va="top", fontsize=9, family="monospace")
    fig.text(0.5, 1 - (0.1 + 0.15 * len(lines)) / height_in, "\n".join(foot), ha="center", va="top",
             fontsize=7, color="#555555")
    layout = fig.add_gridspec(len(heights), cols, height_ratios=heights,
                              left=0.5 / width_in, right=1 - 0.15 / width_in, bottom=0.45 / height_in,
                              top=1 - PNG_TITLE_IN / height_in, wspace=0.35, hspace=0.5 * PNG_PANEL_IN / max(heights))

    shade = LinearSegmentedColormap.from_list("sparseforge", [COLOR_EMPTY, COLOR_KEY])
    cells = ListedColormap([COLOR_EMPTY, COLOR_KEY, COLOR_QUERY, COLOR_QUERY_UNSEEN])
    q_index = flat_index(query, grid)
    mask_rows = math.ceil(len(masks) / cols)
    for i, panel in enumerate(masks):
        ax = fig.add_subplot(layout[i // cols, i % cols])
        n = panel.data.shape[-1]
        ax.imshow(_shrink(panel.data.float(), PNG_MASK_PIXELS).numpy(), cmap=shade, vmin=0, vmax=1,
                  interpolation="nearest", extent=(-0.5, n - 0.5, n - 0.5, -0.5))
        ax.axhline(q_index, color=COLOR_QUERY, linewidth=0.6, alpha=0.8)
        ax.set_xlabel("key", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
        _panel_title(ax, "mask, " + panel.label)
    for i, panel in enumerate(views):
        ax = fig.add_subplot(layout[mask_rows + i // cols, i % cols])
        view = query_view(panel.data, grid, query)
        image = view.cells.long()
        if view.query is not None:
            r, c = view.query
            image[r, c] = 2 if view.cells[r, c] else 3
        r0, c0 = view.origin
        h, w = image.shape
        ax.imshow(image.numpy(), cmap=cells, vmin=0, vmax=3, interpolation="nearest",
                  extent=(c0 - 0.5, c0 + w - 0.5, r0 + h - 0.5, r0 - 0.5), aspect="equal" if h > 1 else "auto")
        if h == 1:
            ax.set_yticks([])
        ax.set_xlabel(view.axes[1], fontsize=7)
        ax.set_ylabel(view.axes[0], fontsize=7)
        _panel_title(ax, f"query {format_query(query)}, {panel.label}" + (f"\n{view.caption}" if view.caption else ""))
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=PNG_DPI))
    return round(width_in * PNG_DPI), round(height_in * PNG_DPI)


def _shrink(image: torch.Tensor, pixels: int) -> torch.Tensor:
    """Average ``image`` [R, C] over square blocks of a whole number of cells, down to at most
    ``pixels`` per side (the fraction of allowed pairs per pixel), so large masks show their
    density instead of aliasing."""
    factor = math.ceil(max(image.shape) / pixels)
    if factor == 1:
        return image
    return torch.nn.functional.avg_pool2d(image[None, None], factor, ceil_mode=True)[0, 0]


def _panel_title(ax, text: str) -> None:
    ax.set_title("\n".join(textwrap.fill(line, 46) for line in text.split("\n")), fontsize=7)
    ax.tick_params(labelsize=6)
