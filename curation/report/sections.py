"""The report's sections that show what the run did: the funnel, duplicate clusters (paged,
with the SQL that lists each one), blurred faces (paged), retrieval beside its seeds, cluster
sizes and timings. A section without data says why instead of disappearing."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.report.data import Images, RunData
from curation.report.html import STAGE_COLORS, esc, figure, follow_up, pager, section, short_key, table


def funnel_section(run: RunData) -> str:
    stages = run.manifest.get("stages", [])
    if not stages:
        return section("funnel", "Funnel", None, "The manifest lists no stages.")
    reasons = sorted({r for s in stages for r in s.get("dropped", {})})
    color = {r: STAGE_COLORS[i % len(STAGE_COLORS)] for i, r in enumerate(reasons)}
    top = max(max(s.get("in", 0) for s in stages), 1)
    label_w, bar_w, row_h = 150, 760, 30
    height = row_h * len(stages) + 20
    parts = [f'<svg class="chart" id="funnel-chart" width="{label_w + bar_w + 120}" height="{height}" role="img" aria-label="images per stage">']
    for i, s in enumerate(stages):
        y = 10 + i * row_h
        n_in, n_out = s.get("in", 0), s.get("out", 0)
        w_out = bar_w * n_out / top
        parts.append(f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">{esc(s["stage"])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w_out:.1f}" height="{row_h - 8}" fill="#8ab17d"><title>{esc(s["stage"])}: {n_out} kept of {n_in}</title></rect>')
        x = label_w + w_out
        for r, n in sorted(s.get("dropped", {}).items()):
            w = bar_w * n / top
            parts.append(f'<rect class="drop" x="{x:.1f}" y="{y}" width="{max(w, 1):.1f}" height="{row_h - 8}" fill="{color[r]}"><title>{esc(s["stage"])}: {n} dropped, {esc(r)}</title></rect>')
            x += max(w, 1)
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 17}">{n_out:,} / {n_in:,}</text>')
    parts.append("</svg>")
    legend = "".join(f'<span class="key"><i style="background:{color[r]}"></i>{esc(r)}</span>' for r in reasons)
    legend = '<div class="legend"><span class="key"><i style="background:#8ab17d"></i>kept</span>' + legend + "</div>"
    c = run.manifest.get("counts", {})
    rows = [[stage, reason, n] for stage, d in sorted(c.get("dropped_by_stage", {}).items()) for reason, n in sorted(d.items())]
    drops = table(["stage", "reason", "dropped"], rows, {2}) if rows else "<p>No image was dropped.</p>"
    return section("funnel", "Funnel: images per stage, drops by reason", "".join(parts) + legend + drops, "")


DUPLICATE_SCORES = ("similarity", "hamming_distance", "inliers")


def fails_own_test(stage_cfg: dict, member: dict) -> bool:
    """Whether a drop's recorded score (to the image kept in its place) fails its stage's own
    test: the sign of a chained group (``grouping: components`` links unlike images through
    look-alikes; ``star`` never records such a drop)."""
    if "similarity" in member and "threshold" in stage_cfg:
        return not member["similarity"] > stage_cfg["threshold"]
    if "hamming_distance" in member and "radius" in stage_cfg:
        return member["hamming_distance"] > stage_cfg["radius"]
    return False


def cluster_sql(stage: str, kept_uid: int) -> str:
    """Every member of one duplicate cluster: the kept image and the copies it stands for."""
    return (
        f"select uid, decision, reason, source_key, details from ledger where uid = {kept_uid} "
        f"or (stage = '{stage}' and details->>'kept_uid' = '{kept_uid}') order by decision desc, uid"
    )


def duplicates_section(run: RunData, images: Images, clusters: int, per_cluster: int, pages: int = 5) -> str:
    """The largest clusters, ``clusters`` per page for up to ``pages`` pages, each with the SQL
    that lists all its members; the SQL for the rest follows the last page."""
    t = run.drops([schema.UID, "stage", "reason", "details", schema.SOURCE_KEY])
    t = t.filter(pc.fill_null(pc.match_substring(t.column("details"), '"kept_uid"'), False))
    if t.num_rows == 0:
        return section("duplicates", "Duplicate clusters", None, "No stage dropped an image as a copy of a kept one (no exact, perceptual or copy-detection duplicates in this run).")
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in t.to_pylist():
        d = json.loads(row["details"])
        groups[(row["stage"], int(d["kept_uid"]))].append({**row, **d})
    configs = {c["name"]: c for c in run.stage_configs}
    chained = {k for k, members in groups.items() if any(fails_own_test(configs.get(k[0], {}), m) for m in members)}
    # Chained groups first (what a reviewer must see), then the largest.
    order = sorted(groups, key=lambda k: (k not in chained, -len(groups[k]), k[0], k[1]))
    shown = order[: clusters * pages]
    need = [k[1] for k in shown] + [r[schema.UID] for k in shown for r in sorted(groups[k], key=lambda r: r[schema.UID])[:per_cluster]]
    data = images.get(need)
    blocks = []
    for stage, kept_uid in shown:
        members = sorted(groups[(stage, kept_uid)], key=lambda r: r[schema.UID])
        first = members[0]
        figs = [figure(data.get(kept_uid), f"kept<br>{esc(short_key(first.get('kept_source_key', kept_uid)))}", "kept")]
        cfg = configs.get(stage, {})
        members = sorted(members, key=lambda r: (not fails_own_test(cfg, r), r[schema.UID]))  # failing copies first
        for r in members[:per_cluster]:
            score = next((f"{name.replace('_', ' ')} {r[name]} to the kept image" for name in DUPLICATE_SCORES if name in r), "identical bytes")
            bad = fails_own_test(cfg, r)
            note = "<br><b>fails the stage's test</b>" if bad else ""
            figs.append(figure(data.get(r[schema.UID]), f"dropped: {esc(r['reason'])}<br>{esc(score)}{note}<br>{esc(short_key(r[schema.SOURCE_KEY]))}", "dropped failing" if bad else "dropped"))
        more = f'<p class="more">+ {len(members) - per_cluster} more copies</p>' if len(members) > per_cluster else ""
        failing = sum(fails_own_test(cfg, r) for r in members)
        flag = (
            f'<p class="warn chained">Chained group: {failing} of {len(members)} dropped images fail {esc(stage)}\'s own test '
            f"against the kept image (grouping: {esc(cfg.get('grouping', 'components'))}; `grouping: star` drops only direct copies).</p>"
            if failing else ""
        )
        blocks.append(
            f'<div class="cluster{" chained" if failing else ""}" data-kept-uid="{kept_uid}"><h3>{esc(stage)}: {len(members) + 1} images, 1 kept (uid {kept_uid})</h3>'
            f'{flag}<div class="gallery">{"".join(figs)}</div>{more}{follow_up(cluster_sql(stage, kept_uid), run.run_dir, "all members of this cluster (SQL)")}</div>'
        )
    total = sum(len(v) for v in groups.values())
    head = f"<p>{total:,} images were dropped as copies, in {len(groups):,} clusters; the {len(shown)} largest are shown, {clusters} per page.</p>"
    if chained:
        head += (
            f'<p class="warn">{len(chained):,} clusters are chained: some of their dropped images fail their stage\'s own '
            "test against the image kept in their place (shown first). Connected components link unlike images through "
            "look-alikes; set <code>grouping: star</code> on the stage to drop only direct copies.</p>"
        )
    rest = ""
    if len(order) > len(shown):
        sql = (
            "select stage, details->>'kept_uid' as kept_uid, count(*) + 1 as images from ledger "
            "where details->>'kept_uid' is not null group by all order by images desc, kept_uid"
        )
        rest = f"<p>{len(order) - len(shown):,} smaller clusters are not shown.</p>{follow_up(sql, run.run_dir, 'every cluster with its size (SQL)')}"
    paged = pager("duplicates-pager", ["".join(blocks[i : i + clusters]) for i in range(0, len(blocks), clusters)], rest)
    return section("duplicates", "Duplicate clusters", head + paged, "")


def faces_section(run: RunData, samples: int, pages: int = 5) -> str:
    """Images as the face_blur stage wrote them (blurred bytes), kept or dropped later."""
    names = [st["stage"] for st in run.manifest.get("stages", []) if st.get("kind") == "face_blur"]
    if not names:
        return section("faces", "Blurred faces", None, "No face_blur stage ran in this pipeline, so no face was blurred.")
    found = [run.stage_output(n, ["faces", schema.BYTES]) for n in names]
    tables = [t.filter(pc.fill_null(pc.greater(t.column("faces"), 0), False)) for t in found if t is not None]
    t = pa.concat_tables(tables).sort_by(schema.UID) if tables else None
    if t is None or t.num_rows == 0:
        return section("faces", "Blurred faces", None, "face_blur ran but found no face to blur.")
    kept = set(pc.unique(run.dataset([schema.UID]).column(schema.UID)).to_pylist())
    rows = t.slice(0, samples * pages).to_pylist()
    figs = [
        figure(r[schema.BYTES], f"{r['faces']} face(s) blurred<br>{'kept' if r[schema.UID] in kept else 'dropped later'}<br>uid {r[schema.UID]}")
        for r in rows
    ]
    n_faces = pc.sum(t.column("faces")).as_py()
    head = f"<p>{n_faces:,} faces blurred in {t.num_rows:,} images; {len(rows)} shown as the stage wrote them, {samples} per page.</p>"
    rest = ""
    if t.num_rows > len(rows):
        sql = f"select uid, faces, face_probs from stage_{names[0]} where faces > 0 order by uid"
        rest = f"<p>{t.num_rows - len(rows):,} more blurred images are not shown.</p>{follow_up(sql, run.run_dir, 'every blurred image (SQL)')}"
    paged = pager("faces-pager", [f'<div class="gallery">{"".join(figs[i : i + samples])}</div>' for i in range(0, len(figs), samples)], rest)
    return section("faces", "Blurred faces", head + paged, "")


RETRIEVED = ("sample", "cluster")


def retrieval_section(run: RunData, images: Images, samples: int, seeds_per_row: int = 3) -> str:
    if "retrieve" not in run.stage_kinds:
        return section("retrieval", "Retrieved images beside their seeds", None, "No retrieve stage ran: the pool was kept without seed-based retrieval.")
    t = run.dataset([schema.UID, "method", schema.SEED_DATASET, "seed_ids", "similarity", "cluster_id", schema.SOURCE_KEY, schema.SOURCE])
    if "seed_ids" not in t.column_names or t.num_rows == 0:
        return section("retrieval", "Retrieved images beside their seeds", None, "The dataset has no retrieval provenance columns.")
    t = t.filter(pc.equal(t.column(schema.SOURCE), "pool"))
    rows = [r for r in t.sort_by(schema.UID).to_pylist() if r["method"] and any(m in RETRIEVED for m in r["method"].split("+"))]
    if not rows:
        return section("retrieval", "Retrieved images beside their seeds", None, "retrieve ran but retrieved no pool image (no seed dataset given, or nothing similar enough).")
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        for name in (r[schema.SEED_DATASET] or "").split(","):
            by_dataset[name].append(r)
    seed_ids = {s for rs in by_dataset.values() for r in rs[:samples] for s in (r["seed_ids"] or [])[:seeds_per_row]}
    seeds = run.ledger([schema.UID, schema.ID, schema.ROLE])
    seeds = seeds.filter(pc.and_(pc.equal(seeds.column(schema.ROLE), schema.SEED), pc.is_in(seeds.column(schema.ID), pa.array(sorted(seed_ids), pa.string()))))
    seed_uid = dict(zip(seeds.column(schema.ID).to_pylist(), seeds.column(schema.UID).to_pylist()))
    data = images.get([r[schema.UID] for rs in by_dataset.values() for r in rs[:samples]] + list(seed_uid.values()))
    blocks = []
    for name in sorted(by_dataset):
        rs = by_dataset[name]
        counts = Counter(r["method"] for r in rs)
        lines = []
        for r in rs[:samples]:
            sim = f"{r['similarity']:.3f}" if r["similarity"] is not None else "-"
            cl = f", cluster {r['cluster_id']}" if r["cluster_id"] is not None else ""
            cells = [figure(data.get(r[schema.UID]), f"retrieved ({esc(r['method'])}{cl})<br>similarity {sim}", "retrieved")]
            for sid in (r["seed_ids"] or [])[:seeds_per_row]:
                cells.append(figure(data.get(seed_uid.get(sid)), f"seed {esc(sid[:10])}", "seed"))
            lines.append(f'<div class="gallery row">{"".join(cells)}</div>')
        summary = ", ".join(f"{m}: {n:,}" for m, n in sorted(counts.items()))
        blocks.append(f'<div class="seedset"><h3>{esc(name)}: {len(rs):,} images retrieved ({esc(summary)})</h3>{"".join(lines)}</div>')
    return section("retrieval", "Retrieved images beside their seeds", "".join(blocks), "")


def cluster_hist_section(run: RunData) -> str:
    t = run.dataset(["cluster_id"])
    if "cluster_id" not in t.column_names:
        return section("clusters", "Cluster sizes", None, "The dataset has no cluster_id column.")
    ids = t.column("cluster_id").drop_null() if t.num_rows else pa.array([], pa.int64())
    if len(ids) == 0:
        return section("clusters", "Cluster sizes", None, "No image came from cluster-based retrieval (cluster_id is empty), so there is no cluster to count.")
    sizes = Counter(Counter(ids.to_pylist()).values())
    # Power-of-two bins: 1, 2-3, 4-7, ... so one huge cluster does not flatten the rest.
    bins: dict[int, int] = defaultdict(int)
    for size, n in sizes.items():
        bins[int(math.log2(size))] += n
    top_bin = max(bins)
    labels = [f"{2**b}" if b == 0 else f"{2**b}-{2**(b + 1) - 1}" for b in range(top_bin + 1)]
    counts = [bins.get(b, 0) for b in range(top_bin + 1)]
    peak = max(counts)
    w, h, pad = 56, 180, 30
    parts = [f'<svg class="chart" id="cluster-hist" width="{pad + w * len(counts) + 20}" height="{h + 50}" role="img" aria-label="clusters by size">']
    for i, (lab, n) in enumerate(zip(labels, counts)):
        bh = h * n / peak
        x = pad + i * w
        parts.append(f'<rect x="{x + 4}" y="{h - bh + 10:.1f}" width="{w - 8}" height="{bh:.1f}" fill="#30638e"><title>{n} clusters of {lab} images</title></rect>')
        parts.append(f'<text x="{x + w / 2}" y="{h - bh + 5:.1f}" text-anchor="middle">{n}</text>')
        parts.append(f'<text x="{x + w / 2}" y="{h + 28}" text-anchor="middle">{lab}</text>')
    parts.append(f'<text x="{pad}" y="{h + 46}">images per cluster</text></svg>')
    head = f"<p>{len(ids):,} images in {sum(sizes.values()):,} clusters (k-means clusters of the pool that retrieval took).</p>"
    return section("clusters", "Cluster sizes", head + "".join(parts), "")


def timings_section(run: RunData) -> str:
    stages = run.manifest.get("stages", [])
    if not stages:
        return section("timings", "Timings", None, "The manifest lists no stages.")
    rows = []
    for s in stages:
        wall = float(s.get("wall_seconds") or s.get("seconds") or 0)
        rate = f"{s.get('in', 0) / wall:,.1f}" if wall > 0 else "-"
        rows.append([s["stage"], s.get("kind", ""), f"{s.get('in', 0):,}", f"{s.get('out', 0):,}", f"{sum(s.get('dropped', {}).values()):,}", f"{float(s.get('seconds', 0)):.2f}", f"{wall:.2f}", rate])
    total = f"<p>Whole run: {run.manifest.get('seconds', 0)} s.</p>"
    return section("timings", "Timings", table(["stage", "kind", "in", "out", "dropped", "worker seconds", "wall seconds", "images/s"], rows, {2, 3, 4, 5, 6, 7}) + total, "")
