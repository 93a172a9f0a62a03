"""HTML building blocks of the report: escaping, thumbnails, sections, tables, SVG histograms,
pagers and follow-up SQL. Everything is inline so the page needs no network."""

from __future__ import annotations

import base64
import html
import io
import re
import shlex
from pathlib import Path

import numpy as np

THUMB = 160
PALETTE = ["#d1495b", "#edae49", "#00798c", "#30638e", "#8f2d56", "#6a994e", "#bc6c25", "#7b2cbf", "#3d405b", "#e07a5f"]
KEPT_COLOR, DROPPED_COLOR = "#6a994e", "#d1495b"
STAGE_COLORS = [c for c in PALETTE if c != KEPT_COLOR]  # never the colour of "kept"


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


def figure(data: bytes | None, caption: str, cls: str = "", missing: str = "not decodable") -> str:
    uri = thumb_uri(data)
    img = f'<img src="{uri}" alt="{esc(caption)}">' if uri else f'<div class="noimg">{esc(missing)}</div>'
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


def follow_up(sql: str, run_dir: Path, label: str = "follow up with SQL") -> str:
    """A copyable `curate query` command (the page cannot run it; the shell can)."""
    quoted = f'"{sql}"' if not re.search(r'["$`\\!]', sql) else shlex.quote(sql)
    cmd = f"curate query {quoted} --run {shlex.quote(str(run_dir))}"
    return f'<details class="sql"><summary>{esc(label)}</summary><code>{esc(cmd)}</code></details>'


def pager(pid: str, pages: list[str], note: str = "") -> str:
    """Pages shown one at a time by the page's script (all of them without script)."""
    if len(pages) <= 1:
        return "".join(pages) + note
    n = len(pages)
    nav = (
        f'<div class="pager-nav"><button type="button" class="prev">&larr; previous</button> '
        f'<span class="pos">page 1 of {n}</span> <button type="button" class="next">next &rarr;</button></div>'
    )
    body = "".join(f'<div class="page" data-page="{i + 1}">{p}</div>' for i, p in enumerate(pages))
    return f'<div class="pager" id="{esc(pid)}" data-pages="{n}">{nav}{body}</div>{note}'


def histogram(
    hid: str, series: list[tuple[str, np.ndarray, str]], edges: np.ndarray, xlabel: str,
    threshold: float | None = None, threshold_label: str | None = None, note: str = "", ticks: str = "{:g}", integer: bool = False,
) -> str:
    """Stacked histogram of several series over the same bins, with the threshold marked.

    ``edges`` may be uneven (log bins): the x axis is in bin units, and the threshold is placed
    by interpolating between edges. Values outside the edges count in the first or last bin.
    ``ticks`` formats the edge labels; ``integer`` labels bin centres instead (one bin per value)."""
    edges = np.asarray(edges, np.float64)
    n = len(edges) - 1
    counts = [np.histogram(np.clip(np.asarray(v, np.float64), edges[0], edges[-1]), bins=edges)[0] for _, v, _ in series]
    peak = max(1, int(np.sum(counts, axis=0).max()) if counts else 1)
    left, width, height, bottom = 46, 520, 170, 44
    bw = width / n
    parts = [f'<svg class="chart hist" id="{esc(hid)}" width="{left + width + 20}" height="{height + bottom + 10}" role="img" aria-label="{esc(xlabel)}">']
    parts.append(f'<line x1="{left}" y1="{height + 8}" x2="{left + width}" y2="{height + 8}" stroke="#999"/>')
    parts.append(f'<text x="{left - 6}" y="16" text-anchor="end">{peak:,}</text><text x="{left - 6}" y="{height + 8}" text-anchor="end">0</text>')
    base = np.zeros(n)
    for (label, _, color), c in zip(series, counts):
        for i in range(n):
            if c[i]:
                h = height * c[i] / peak
                y = height + 8 - height * base[i] / peak - h
                parts.append(
                    f'<rect x="{left + i * bw + 1:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" fill="{color}">'
                    f"<title>{esc(label)}: {int(c[i]):,} in [{edges[i]:g}, {edges[i + 1]:g})</title></rect>"
                )
        base += c
    step = max(1, n // (12 if integer else 6))
    for i in range(0, n + (0 if integer else 1), step):
        x, value = (left + (i + 0.5) * bw, (edges[i] + edges[i + 1]) / 2) if integer else (left + i * bw, edges[i])
        parts.append(f'<text x="{x:.1f}" y="{height + 24}" text-anchor="middle">{esc(ticks.format(value))}</text>')
    parts.append(f'<text x="{left + width / 2}" y="{height + 42}" text-anchor="middle">{esc(xlabel)}</text>')
    if threshold is not None:
        pos = float(np.interp(threshold, edges, np.arange(n + 1)))
        x = left + pos * bw
        text = threshold_label or f"threshold {threshold:g}"
        # The label sits right of the line, or left of it when the line is near the right edge.
        anchor, tx = ("end", x - 4) if x > left + width - 7 * len(text) else ("start", x + 4)
        parts.append(
            f'<line class="threshold" x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{height + 8}" stroke="#111" stroke-width="2" stroke-dasharray="5,3"/>'
            f'<text class="threshold-label" x="{tx:.1f}" y="14" text-anchor="{anchor}">{esc(text)}</text>'
        )
    parts.append("</svg>")
    legend = "".join(f'<span class="key"><i style="background:{c}"></i>{esc(lab)} ({len(v):,})</span>' for lab, v, c in series)
    caption = f'<p class="chart-note">{note}</p>' if note else ""
    return f'<div class="chart-box" data-threshold="{"" if threshold is None else f"{threshold:g}"}">{"".join(parts)}<div class="legend">{legend}</div>{caption}</div>'
