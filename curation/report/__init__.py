"""``curate report RUN``: one self-contained HTML page that shows a person what a run did.

Everything is inline (CSS, a few lines of JS, SVG charts, thumbnails as ``data:`` URIs), so the
page opens from disk or an e-mail attachment with no network. Sections: the funnel (images per
stage, drops by reason) and the funnel of every source; the score distributions each threshold
cuts (NSFW score, face probability, Hamming distance, cosine similarity), with the threshold
marked; sizes and aspect ratios of kept and dropped images; example images per drop reason;
duplicate clusters (kept representative beside its dropped copies, paged, each with the SQL that
lists it); blurred faces (paged); per seed dataset retrieved images beside their seeds; the
cluster-size histogram and the timings table. A section without data says why.

Sampling is deterministic (largest clusters first, then by uid), so two reports of the same run
are identical.
"""

from __future__ import annotations

from pathlib import Path

from curation.report.data import Images, RunData
from curation.report.html import esc
from curation.report.insights import drops_section, scores_section, sizes_section, sources_section
from curation.report.sections import cluster_hist_section, duplicates_section, faces_section, funnel_section, retrieval_section, timings_section

__all__ = ["Images", "RunData", "build_report", "write_report", "add_subcommands"]


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
figure.kept img,figure.retrieved img{border-color:#6a994e}figure.dropped img{border-color:#d1495b}figure.failing img{border-style:dashed}figure.seed img{border-color:#30638e}
figure img.zoom{max-width:none;max-height:none;width:320px}
.noimg{width:150px;height:100px;display:flex;align-items:center;justify-content:center;background:#eee;color:#999}
table{border-collapse:collapse;margin-top:8px}td,th{border:1px solid #ddd;padding:3px 8px}td.num{text-align:right;font-variant-numeric:tabular-nums}
.chart text{font-size:12px;fill:#333}.legend .key{margin-right:12px;font-size:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
.charts{display:flex;flex-wrap:wrap;gap:16px}.chart-box{border:1px solid #eee;padding:6px}.chart-note{font-size:11px;color:#666;max-width:580px;margin:2px 0}
.chart .threshold-label{font-size:11px;fill:#111;font-weight:600}
details.sql{margin:4px 0 10px;font-size:12px}details.sql code{display:block;white-space:pre-wrap;background:#f3f3f3;padding:4px 6px;user-select:all}
.pager-nav{margin:6px 0}.pager-nav button{font:inherit;padding:2px 10px}.pager-nav .pos{margin:0 8px;color:#555}
.src-bar{display:flex;align-items:center;gap:8px;margin:3px 0;font-size:12px}.src-bar span{width:220px;text-align:right;overflow-wrap:anywhere}
.src-bar .bar{display:flex;width:600px;height:14px;background:#eee}.src-bar .bar i{display:block;height:100%}
"""

# Marks the page as rendered (headless tests read data-rendered), lets thumbnails zoom and
# shows paged galleries one page at a time.
JS = """
window.addEventListener('error', function (e) { document.body.setAttribute('data-errors', String(e.message)); });
document.addEventListener('DOMContentLoaded', function () {
  var sections = document.querySelectorAll('section.report-section');
  var pagers = document.querySelectorAll('.pager');
  pagers.forEach(function (pg) {
    var pages = pg.querySelectorAll(':scope > .page'), cur = 0;
    function show(i) {
      cur = Math.max(0, Math.min(pages.length - 1, i));
      pages.forEach(function (p, j) { p.hidden = j !== cur; });
      pg.querySelector('.pos').textContent = 'page ' + (cur + 1) + ' of ' + pages.length;
      pg.setAttribute('data-current', String(cur + 1));
    }
    pg.querySelector('.prev').addEventListener('click', function () { show(cur - 1); });
    pg.querySelector('.next').addEventListener('click', function () { show(cur + 1); });
    show(0);
  });
  document.body.setAttribute('data-pagers', String(pagers.length));
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
            sources_section(run),
            scores_section(run),
            sizes_section(run),
            drops_section(run, images, max(1, samples // 2)),
            duplicates_section(run, images, clusters, max(1, samples // 2)),
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
