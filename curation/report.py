"""``curate report RUN``: one self-contained HTML page that shows a person what a run did.

Everything is inline (CSS, a few lines of JS, SVG charts, thumbnails as ``data:`` URIs), so the
page opens from disk or an e-mail attachment with no network. Sections: the funnel (images per
stage, drops by reason), duplicate clusters (kept representative beside its dropped copies),
blurred faces, per seed dataset retrieved images beside their seeds, the cluster-size histogram
and the timings table. A section without data says why instead of disappearing.

Sampling is deterministic (largest clusters first, then by uid), so two reports of the same run
are identical.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from curation import schema
from curation.ledger import read_ledger

THUMB = 160
PALETTE = ["#d1495b", "#edae49", "#00798c", "#30638e", "#8f2d56", "#6a994e", "#bc6c25", "#7b2cbf", "#3d405b", "#e07a5f"]


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------
class Images:
    """Image bytes by uid: the emitted (possibly blurred) copy if the row was kept, else the
    ingested original. Reads only the shards asked for."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        ingest = sorted((run_dir / "stages").glob("*_ingest"))
        self.ingest_dir = ingest[0] if ingest else None

    def _read(self, path: Path, uids: list[int]) -> dict[int, bytes]:
        if not path.exists():
            return {}
        t = pq.read_table(path, columns=[schema.UID, schema.BYTES], filters=[(schema.UID, "in", uids)])
        return dict(zip(t.column(schema.UID).to_pylist(), t.column(schema.BYTES).to_pylist()))

    def get(self, uids) -> dict[int, bytes]:
        by_shard: dict[int, list[int]] = defaultdict(list)
        for u in set(int(u) for u in uids):
            by_shard[schema.shard_of_uid(u)].append(u)
        out: dict[int, bytes] = {}
        for shard, us in by_shard.items():
            name = f"part-{shard:05d}.parquet"
            found = self._read(self.run_dir / "dataset" / name, us)
            missing = [u for u in us if u not in found]
            if missing and self.ingest_dir is not None:
                found.update(self._read(self.ingest_dir / name, missing))
            out.update(found)
        return out


@dataclass
class RunData:
    run_dir: Path
    manifest: dict
    status: dict

    @classmethod
    def load(cls, run_dir: Path) -> "RunData":
        run_dir = Path(run_dir).resolve()
        mpath = run_dir / "manifest.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"{mpath} does not exist: {run_dir} is not a finished run (see `curate status --run {run_dir}`)")
        spath = run_dir / "status.json"
        status = json.loads(spath.read_text()) if spath.is_file() else {}
        return cls(run_dir, json.loads(mpath.read_text()), status)

    @property
    def stage_kinds(self) -> list[str]:
        return [s.get("kind") for s in self.manifest.get("config", {}).get("stages", []) if s.get("enabled", True)]

    def dataset(self, columns: list[str]) -> pa.Table:
        files = sorted((self.run_dir / "dataset").glob("part-*.parquet"))
        if not files:
            return pa.table({c: pa.array([], pa.null()) for c in columns})
        ds = pads.dataset([str(f) for f in files], format="parquet")
        present = [c for c in columns if c in ds.schema.names]
        return ds.to_table(columns=present)

    def ledger(self, columns=None, filter=None) -> pa.Table:
        t = read_ledger(self.run_dir / "ledger", columns=columns)
        return t.filter(filter) if filter is not None else t


# ---------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------
def esc(x) -> str:
    return html.escape(str(x), quote=True)


def thumb_uri(data: bytes | None) -> str | None:
    from curation.imaging import DecodeError, decode_rgb

    if not data:
        return None
    try:
        img = decode_rgb(data)
    except DecodeError:
        return None
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def figure(data: bytes | None, caption: str, cls: str = "") -> str:
    uri = thumb_uri(data)
    img = f'<img src="{uri}" alt="{esc(caption)}">' if uri else '<div class="noimg">not decodable</div>'
    return f'<figure class="{cls}">{img}<figcaption>{caption}</figcaption></figure>'


def short_key(key) -> str:
    """The last two parts of a path or URL: enough to find the file, short enough to read."""
    parts = [p for p in str(key).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if parts else str(key)


def section(sid: str, title: str, body: str | None, empty_reason: str) -> str:
    state = "filled" if body else "empty"
    content = body if body else f'<p class="empty-note">{esc(empty_reason)}</p>'
    return f'<section id="{sid}" class="report-section {state}" data-state="{state}"><h2>{esc(title)}</h2>{content}</section>'


def table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if i in numeric else ""}">{esc(v)}</td>' for i, v in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
def funnel_section(run: RunData) -> str:
    stages = run.manifest.get("stages", [])
    if not stages:
        return section("funnel", "Funnel", None, "The manifest lists no stages.")
    reasons = sorted({r for s in stages for r in s.get("dropped", {})})
    color = {r: PALETTE[i % len(PALETTE)] for i, r in enumerate(reasons)}
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


def duplicates_section(run: RunData, images: Images, clusters: int, per_cluster: int) -> str:
    t = run.ledger([schema.UID, "stage", "reason", "details", schema.SOURCE_KEY])
    t = t.filter(pc.fill_null(pc.match_substring(t.column("details"), '"kept_uid"'), False))
    if t.num_rows == 0:
        return section("duplicates", "Duplicate clusters", None, "No stage dropped an image as a copy of a kept one (no exact, perceptual or copy-detection duplicates in this run).")
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in t.to_pylist():
        d = json.loads(row["details"])
        groups[(row["stage"], int(d["kept_uid"]))].append({**row, **d})
    order = sorted(groups, key=lambda k: (-len(groups[k]), k[0], k[1]))[:clusters]
    need = [k[1] for k in order] + [r[schema.UID] for k in order for r in sorted(groups[k], key=lambda r: r[schema.UID])[:per_cluster]]
    data = images.get(need)
    blocks = []
    for stage, kept_uid in order:
        members = sorted(groups[(stage, kept_uid)], key=lambda r: r[schema.UID])
        first = members[0]
        figs = [figure(data.get(kept_uid), f"kept<br>{esc(short_key(first.get('kept_source_key', kept_uid)))}", "kept")]
        for r in members[:per_cluster]:
            score = next((f"{name.replace('_', ' ')} {r[name]}" for name in DUPLICATE_SCORES if name in r), "identical bytes")
            figs.append(figure(data.get(r[schema.UID]), f"dropped: {esc(r['reason'])}<br>{esc(score)}<br>{esc(short_key(r[schema.SOURCE_KEY]))}", "dropped"))
        more = f'<p class="more">+ {len(members) - per_cluster} more copies</p>' if len(members) > per_cluster else ""
        blocks.append(f'<div class="cluster"><h3>{esc(stage)}: {len(members) + 1} images, 1 kept</h3><div class="gallery">{"".join(figs)}</div>{more}</div>')
    total = sum(len(v) for v in groups.values())
    head = f"<p>{total:,} images were dropped as copies, in {len(groups):,} clusters; the {len(order)} largest are shown.</p>"
    return section("duplicates", "Duplicate clusters", head + "".join(blocks), "")


def faces_section(run: RunData, samples: int) -> str:
    """Images as the face_blur stage wrote them (blurred bytes), kept or dropped later."""
    names = [st["stage"] for st in run.manifest.get("stages", []) if st.get("kind") == "face_blur"]
    if not names:
        return section("faces", "Blurred faces", None, "No face_blur stage ran in this pipeline, so no face was blurred.")
    parts = sorted(p for n in names for d in (run.run_dir / "stages").glob(f"*_{n}") for p in d.glob("part-*.parquet"))
    tables = [pq.read_table(p, columns=[schema.UID, "faces", schema.BYTES], filters=[("faces", ">", 0)]) for p in parts]
    t = pa.concat_tables(tables).sort_by(schema.UID) if tables else None
    if t is None or t.num_rows == 0:
        return section("faces", "Blurred faces", None, "face_blur ran but found no face to blur.")
    kept = set(pc.unique(run.dataset([schema.UID]).column(schema.UID)).to_pylist()) if t.num_rows else set()
    rows = t.slice(0, samples).to_pylist()
    figs = [
        figure(r[schema.BYTES], f"{r['faces']} face(s) blurred<br>{'kept' if r[schema.UID] in kept else 'dropped later'}")
        for r in rows
    ]
    n_faces = pc.sum(t.column("faces")).as_py()
    head = f"<p>{n_faces:,} faces blurred in {t.num_rows:,} images; {len(rows)} shown as the stage wrote them.</p>"
    return section("faces", "Blurred faces", head + f'<div class="gallery">{"".join(figs)}</div>', "")


RETRIEVED = ("sample", "cluster")


def retrieval_section(run: RunData, images: Images, samples: int, seeds_per_row: int = 3) -> str:
    if "retrieve" not in run.stage_kinds:
        return section("retrieval", "Retrieved images beside their seeds", None, "No retrieve stage ran: the pool was kept without seed-based retrieval.")
    t = run.dataset([schema.UID, "method", schema.SEED_DATASET, "seed_ids", "similarity", "cluster_id", schema.SOURCE_KEY, schema.ROLE])
    if "seed_ids" not in t.column_names or t.num_rows == 0:
        return section("retrieval", "Retrieved images beside their seeds", None, "The dataset has no retrieval provenance columns.")
    t = t.filter(pc.equal(t.column(schema.ROLE), schema.POOL))
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


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px}h3{font-size:15px;margin:12px 0 6px}
.summary span{display:inline-block;margin-right:18px}.warn{background:#fde2e1;border:1px solid #d1495b;padding:6px 10px;margin:6px 0}
section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:8px 16px 16px;margin:16px 0}
.empty-note{color:#777;font-style:italic}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.gallery.row{border-top:1px dashed #ddd;padding-top:6px;margin-top:6px}
figure{margin:0;width:170px;text-align:center;font-size:11px;color:#444;overflow-wrap:anywhere}
figure img{max-width:160px;max-height:160px;border:3px solid #ccc;cursor:zoom-in}
figure.kept img,figure.retrieved img{border-color:#6a994e}figure.dropped img{border-color:#d1495b}figure.seed img{border-color:#30638e}
figure img.zoom{max-width:none;max-height:none;width:320px}
.noimg{width:150px;height:100px;display:flex;align-items:center;justify-content:center;background:#eee;color:#999}
table{border-collapse:collapse;margin-top:8px}td,th{border:1px solid #ddd;padding:3px 8px}td.num{text-align:right;font-variant-numeric:tabular-nums}
.chart text{font-size:12px;fill:#333}.legend .key{margin-right:12px;font-size:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
"""

# Marks the page as rendered (headless tests read data-rendered) and lets thumbnails zoom.
JS = """
window.addEventListener('error', function (e) { document.body.setAttribute('data-errors', String(e.message)); });
document.addEventListener('DOMContentLoaded', function () {
  var sections = document.querySelectorAll('section.report-section');
  document.querySelectorAll('figure img').forEach(function (img) {
    img.addEventListener('click', function () { img.classList.toggle('zoom'); });
  });
  var broken = Array.prototype.filter.call(document.images, function (i) { return i.complete && i.naturalWidth === 0; });
  document.body.setAttribute('data-sections', String(sections.length));
  document.body.setAttribute('data-filled', String(document.querySelectorAll('section.filled').length));
  document.body.setAttribute('data-broken-images', String(broken.length));
  document.body.setAttribute('data-rendered', 'ok');
});
"""


def build_report(run_dir: Path, samples: int = 12, clusters: int = 6) -> str:
    run = RunData.load(run_dir)
    images = Images(run.run_dir)
    m = run.manifest
    c = m.get("counts", {})
    dropped = sum(c.get("dropped", {}).values())
    warnings = "".join(f'<div class="warn">WARNING: {esc(w)}</div>' for w in m.get("warnings", []))
    summary = (
        f'<p class="summary"><span>input <b>{c.get("input", 0):,}</b></span><span>kept <b>{c.get("kept", 0):,}</b></span>'
        f'<span>dropped <b>{dropped:,}</b></span><span>shards {len(m.get("shards", []))}</span>'
        f'<span>pipeline <b>{esc(m.get("config", {}).get("name", "?"))}</b></span><span>fingerprint {esc(m.get("fingerprint", ""))}</span>'
        f'<span>created {esc(m.get("created", ""))}</span></p>'
    )
    body = "".join(
        [
            funnel_section(run),
            duplicates_section(run, images, clusters, samples // 2),
            faces_section(run, samples),
            retrieval_section(run, images, max(1, samples // 3)),
            cluster_hist_section(run),
            timings_section(run),
        ]
    )
    title = f"curation report: {run.run_dir.name}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">'
        f"<style>{CSS}</style><script>{JS}</script></head>"
        f"<body><h1>{esc(title)}</h1><p>{esc(run.run_dir)}</p>{summary}{warnings}{body}</body></html>"
    )


def write_report(run_dir: Path, out: Path | None = None, samples: int = 12) -> Path:
    out = Path(out) if out else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(build_report(Path(run_dir), samples=samples), encoding="utf-8")
    tmp.replace(out)
    return out


def cmd_report(args) -> int:
    path = write_report(Path(args.run), Path(args.out) if args.out else None, samples=args.samples)
    print(path)
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("report", help="write a self-contained HTML report of a finished run")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html)")
    p.add_argument("--samples", type=int, default=12, help="images shown per gallery (default: 12)")
    p.set_defaults(func=cmd_report)
