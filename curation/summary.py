"""The end-of-run summary table: per stage in, out, drops by reason, seconds, images/s."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def summary_table(manifest: dict) -> Table:
    t = Table(title=f"curation run: {manifest['run_dir']}")
    for col in ("stage", "in", "out", "dropped (reason: n)", "seconds", "images/s"):
        t.add_column(col, justify="right" if col in ("in", "out", "seconds", "images/s") else "left")
    not_applied = {name for name, rep in manifest.get("stage_reports", {}).items() if rep.get("applied") is False}
    for s in manifest["stages"]:
        secs = float(s.get("wall_seconds") or s.get("seconds") or 0.0)
        rate = f"{s['in'] / secs:,.0f}" if secs > 0 else "-"
        drops = ", ".join(f"{r}: {n}" for r, n in sorted(s.get("dropped", {}).items())) or "-"
        if s["stage"] in not_applied:
            drops = "[bold red]NOT APPLIED[/bold red]"
        t.add_row(s["stage"], f"{s['in']:,}", f"{s['out']:,}", drops, f"{secs:.2f}", rate)
    return t


def print_summary(manifest: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(manifest))
    c = manifest["counts"]
    console.print(
        f"input {c['input']:,} = kept {c['kept']:,} + dropped {sum(c['dropped'].values()):,} "
        f"in {len(manifest['shards'])} shard(s); manifest: {manifest['run_dir']}/manifest.json"
    )
    levels = next((s.get("summary", {}).get("pool_clustering", {}).get("levels") for s in manifest["stages"] if s.get("kind") == "retrieve"), None)
    for name, s in manifest.get("seeds", {}).items():
        r = s.get("retrieval", {})
        extra = ", ".join(f"{k} {v}" for k, v in r.items() if not isinstance(v, (dict, list)))
        console.print(f"seed dataset {name}: as-is kept {s['as_is_kept']:,}" + (f"; {extra}" if extra else ""))
        for recipe in r.get("recipes", []):
            if recipe.get("sampling") == "balanced":
                spread = recipe.get("images_per_top_cluster")
                console.print(
                    f"  cluster recipe, balanced over levels {levels}: {recipe['retrieved']:,} images (cap {recipe['cap']:,}) from "
                    f"{recipe['clusters_selected']:,} seeded clusters under {recipe.get('top_clusters_used', 0):,} top clusters"
                    + (f", per top cluster min/median/max {spread[0]:,}/{spread[1]:,.0f}/{spread[2]:,}" if spread else "")
                )
    for w in manifest.get("warnings", []):
        console.print(f"[bold red]WARNING:[/bold red] {w}")
