"""Reporting a suite result: one summary line per case for the text table, and the plot
(speedup over the best peer; tile efficiency for CPU results). matplotlib is imported
only when plotting."""
from __future__ import annotations

import math


def _ms(entry: dict | None, key: str) -> str:
    e = (entry or {}).get(key, {})
    return f"{e['median_ms']:.1f} ms" if "median_ms" in e else "-"


def table_rows(result: dict) -> list[tuple[str, str]]:
    """(case, one-line summary) for a text table."""
    rows = []
    for c in result["cases"]:
        if c["status"] != "ok":
            rows.append((c["id"], c["reason"]))
            continue
        parts = []
        eff = c.get("tile_efficiency")
        if eff:
            parts.append(f"tile eff {eff['ours']:.3f} vs 1-D {eff['one_d_128']:.3f} ({eff['size']}), "
                         f"visited {eff['visited_tiles']} vs {eff['visited_tiles_1d_128']}")
        b = c.get("schedule_build")
        if b:
            flex_b = b.get("flex_create_block_mask_s")
            parts.append(f"build {b['sparseforge_build_schedule_s'] * 1e3:.1f} ms vs block mask "
                         + (f"{flex_b * 1e3:.1f} ms" if flex_b is not None else "-"))
        setup = c.get("setup")
        if setup:
            parts.append("set-up " + ", ".join(f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in setup.items()
                                                if k.endswith("_s")))
        comp = c.get("compile")
        if comp:
            parts.append(f"compile cold {comp['cold_s'] * 1e3:.0f} ms / warm {comp['warm_s'] * 1e3:.1f} ms")
        ops = c.get("op_time_cpu") or c.get("op_time_cuda") or {}
        parts.append("fwd " + ", ".join(f"{n} {_ms(t, 'forward')}" for n, t in ops.items()))
        parts.append("fwd+bwd " + ", ".join(f"{n} {_ms(t, 'forward_backward')}" for n, t in ops.items()))
        rows.append((c["id"], "; ".join(parts)))
    return rows


def plot(result: dict, out_png: str) -> str:
    """Bar chart of the forward speedup over the best peer (and, for CPU results, tile
    efficiency ours vs 1-D 128x128), one bar per runnable case; written atomically."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparseforge.atomic import write_atomic

    cases = [c for c in result["cases"] if c.get("status") == "ok"]
    ids = [c["id"] for c in cases]
    speed = [c.get("speedup_vs_best_peer", {}).get("forward", {}).get("speedup_x", float("nan")) for c in cases]
    has_eff = any(c.get("tile_efficiency") for c in cases)
    fig, axes = plt.subplots(2 if has_eff else 1, 1, figsize=(max(6, 0.7 * len(ids) + 2), 7 if has_eff else 3.8),
                             squeeze=False)
    ax = axes[0][0]
    ax.bar(ids, speed, color=["tab:green" if s >= 1 else "tab:red" for s in speed])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    meta = result["meta"]
    ax.set_ylabel(f"speedup vs best peer\n(forward, {'CPU op time' if meta['mode'] == 'cpu' else 'CUDA'})")
    ax.set_title(f"sparseforge benchmark suite, {meta['mode']} ({meta['device']})", fontsize=9)
    for x, s in enumerate(speed):
        if math.isfinite(s):
            ax.annotate(f"{s:.2g}x", (x, s), ha="center", va="bottom", fontsize=7)
    if has_eff:
        ax2 = axes[1][0]
        xs = range(len(ids))
        ours = [c.get("tile_efficiency", {}).get("ours", float("nan")) for c in cases]
        base = [c.get("tile_efficiency", {}).get("one_d_128", float("nan")) for c in cases]
        ax2.bar([x - 0.2 for x in xs], ours, width=0.4, label="sparseforge tiles")
        ax2.bar([x + 0.2 for x in xs], base, width=0.4, label="1-D 128x128 tiles")
        scaled = [c.get("tile_efficiency", {}).get("size") == "scaled" for c in cases]
        ax2.set_xticks(list(xs), [i + ("*" if sc else "") for i, sc in zip(ids, scaled)])
        ax2.set_ylim(0, 1.25)  # headroom for the legend above the bars
        ax2.set_ylabel("tile efficiency")
        if any(scaled):
            ax2.set_xlabel("* at the scaled size (no cheap exact method at full size)", fontsize=8)
        ax2.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(out_png, buf.getvalue())
    return out_png
