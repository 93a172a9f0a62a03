"""The report's sections for tuning a pipeline: example images per drop reason, the score
distributions each threshold cuts (with the threshold marked), the sizes and aspect ratios of
kept and dropped images, and the funnel of every source.

Dedup histograms show two populations: the recorded score of every dropped image against the
image kept in its place, and, for a deterministic sample of the images the stage kept, the score
of their nearest neighbour among a larger sample (the side of the threshold that did not fire).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.report.data import Images, RunData
from curation.report.html import DROPPED_COLOR, KEPT_COLOR, PALETTE, STAGE_COLORS, esc, figure, follow_up, histogram, section, short_key, table

QUERIES, BASE = 1000, 10000  # nearest-neighbour samples: cost QUERIES x BASE per chart
DETAIL_KEYS = ("score", "similarity", "hamming_distance", "error", "status")


def sql_text(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


# -- example images per drop reason -----------------------------------------------------------
def _detail(details: str | None) -> str:
    if not details:
        return ""
    try:
        d = json.loads(details)
    except ValueError:
        return details[:60]
    if not isinstance(d, dict):
        return str(d)[:60]
    if "width" in d and "height" in d:
        return f"{d['width']}x{d['height']}"
    for k in DETAIL_KEYS:
        if k in d:
            return f"{k.replace('_', ' ')} {str(d[k])[:60]}"
    return ""


def drops_section(run: RunData, images: Images, per_reason: int = 6) -> str:
    t = run.drops([schema.UID, "stage", "reason", "details", schema.SOURCE_KEY])
    if t.num_rows == 0:
        return section("drops", "Dropped images by reason", None, "No image was dropped.")
    by_reason: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in t.sort_by(schema.UID).to_pylist():
        by_reason[(r["stage"], r["reason"] or "?")].append(r)
    order = sorted(by_reason, key=lambda k: (-len(by_reason[k]), k))
    data = images.get([r[schema.UID] for k in order for r in by_reason[k][:per_reason]])
    blocks = []
    for stage, reason in order:
        rows = by_reason[(stage, reason)]
        figs = [
            figure(data.get(r[schema.UID]), f"{esc(short_key(r[schema.SOURCE_KEY]))}<br>{esc(_detail(r['details']))}", "dropped",
                   missing="not decodable" if r[schema.UID] in data else "no image bytes")
            for r in rows[:per_reason]
        ]
        sql = f"select uid, source_key, details from ledger where stage = {sql_text(stage)} and reason = {sql_text(reason)} order by uid"
        blocks.append(
            f'<div class="reason" data-reason="{esc(reason)}"><h3>{esc(stage)} / {esc(reason)}: {len(rows):,} images</h3>'
            f'<div class="gallery">{"".join(figs)}</div>{follow_up(sql, run.run_dir, f"all {len(rows):,} (SQL)")}</div>'
        )
    head = f"<p>The first {per_reason} images (by uid) of each drop reason, as they were ingested.</p>"
    return section("drops", "Dropped images by reason", head + "".join(blocks), "")


# -- score distributions -------------------------------------------------------------------------
def _sample(uids: np.ndarray, n: int) -> np.ndarray:
    if len(uids) <= n:
        return uids
    return np.unique(uids[np.linspace(0, len(uids) - 1, n).astype(np.int64)])


def _drop_values(run: RunData, stage: str, key: str) -> np.ndarray:
    t = run.drops(["stage", "details"])
    t = t.filter(pc.equal(t.column("stage"), stage))
    vals = [json.loads(d).get(key) for d in t.column("details").to_pylist() if d]
    return np.array([v for v in vals if v is not None], np.float64)


def _rows(run: RunData, column: str, uids: np.ndarray, extra: tuple[str, ...] = ()) -> pa.Table | None:
    writer = run.column_writer(column)
    t = run.stage_output(writer, [column, *extra]) if writer else None
    if t is None:
        return None
    t = t.filter(pc.is_in(t.column(schema.UID), pa.array(uids, pa.int64())))
    return t.filter(pc.is_valid(t.column(column)))


def _unit_rows(t: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    from curation.dedup.descriptors import descriptor_matrix, normalize_rows

    x, _ = descriptor_matrix(t.column(column), column)
    return t.column(schema.UID).to_numpy(), normalize_rows(x)


def nearest_similarity(run: RunData, column: str, queries: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Cosine similarity of each query row to its nearest other row of ``base``."""
    qt, bt = _rows(run, column, queries), _rows(run, column, base)
    if qt is None or bt is None or qt.num_rows == 0 or bt.num_rows == 0:
        return np.zeros(0)
    (qu, q), (bu, b) = _unit_rows(qt, column), _unit_rows(bt, column)
    sims = q @ b.T
    sims[qu[:, None] == bu[None, :]] = -np.inf
    best = sims.max(axis=1)
    return best[np.isfinite(best)]


def nearest_hamming(run: RunData, column: str, flip: bool, queries: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Hamming distance of each query hash to its nearest other hash of ``base`` (mirrored too)."""
    cols = (f"{column}_flip",) if flip else ()
    qt, bt = _rows(run, column, queries), _rows(run, column, base, cols)
    if qt is None or bt is None or qt.num_rows == 0 or bt.num_rows == 0:
        return np.zeros(0)
    qu, q = qt.column(schema.UID).to_numpy(), qt.column(column).to_numpy().astype(np.uint64)
    bu = bt.column(schema.UID).to_numpy()
    best = np.full(len(q), 65, np.int64)
    for c in (column, *cols):
        valid = pc.is_valid(bt.column(c)).to_numpy(zero_copy_only=False)
        codes = pc.fill_null(bt.column(c), 0).to_numpy().astype(np.uint64)
        for start in range(0, len(q), 100):
            d = np.bitwise_count(q[start : start + 100, None] ^ codes[None, :]).astype(np.int64)
            d[(qu[start : start + 100, None] == bu[None, :]) | ~valid[None, :]] = 65
            best[start : start + 100] = np.minimum(best[start : start + 100], d.min(axis=1))
    return best[best <= 64]


def _population(run: RunData, stage: str) -> tuple[np.ndarray, np.ndarray]:
    passed = run.passed(stage)
    return _sample(passed, QUERIES), _sample(passed, BASE)


def _dedup_chart(run: RunData, sc: dict) -> str | None:
    name, kind = sc["name"], sc["kind"]
    if kind in ("phash_dedup", "pca_hash"):
        dropped = _drop_values(run, name, "hamming_distance")
        radius = int(sc.get("radius", 0))
        kept = np.zeros(0)
        note = "kept: nearest-neighbour distance within a sample of the images this stage kept"
        if kind == "phash_dedup":
            q, b = _population(run, name)
            kept = nearest_hamming(run, sc.get("column", "phash"), bool(sc.get("flip", True)), q, b)
        else:
            note = "pca_hash computes its codes in memory, so only the dropped pairs' distances are known"
        top = int(min(64, max(3 * radius + 4, 12, dropped.max(initial=0), kept.max(initial=0))))
        series = [("kept: nearest other image", kept, KEPT_COLOR), ("dropped: distance to the kept copy", dropped, DROPPED_COLOR)]
        return histogram(f"hist-{name}", series, np.arange(-0.5, top + 1.0), f"{name}: Hamming distance (bits)",
                         radius + 0.5, f"duplicate if <= {radius}", note, "{:.0f}", integer=True)
    dropped = _drop_values(run, name, "similarity")
    q, b = _population(run, name)
    if kind == "copy_dedup":
        kept = nearest_similarity(run, sc.get("descriptor"), q, b)
        label, note = "kept: nearest other image", "kept: nearest-neighbour cosine within a sample of the images this stage kept"
    else:  # decontaminate: how close kept pool images come to the evaluation images
        roles = run.ledger([schema.UID, schema.ROLE])
        evals = np.sort(roles.filter(pc.equal(roles.column(schema.ROLE), schema.EXCLUDE)).column(schema.UID).to_numpy())
        kept = nearest_similarity(run, sc.get("descriptor"), q, _sample(evals, BASE)) if len(evals) else np.zeros(0)
        label, note = "kept: nearest evaluation image", "kept: cosine to the nearest evaluation image, for a sample of kept pool images"
    series = [(label, kept, KEPT_COLOR), ("dropped: similarity recorded with the drop", dropped, DROPPED_COLOR)]
    return histogram(f"hist-{name}", series, np.linspace(0, 1, 21), f"{name}: cosine similarity", float(sc.get("threshold", 0)), None, note)


def _nsfw_chart(run: RunData, sc: dict) -> str | None:
    name = sc["name"]
    t = run.stage_output(name, ["nsfw_score"])
    kept = t.column("nsfw_score").drop_null().to_numpy() if t is not None else np.zeros(0)
    dropped = _drop_values(run, name, "score")
    if len(kept) + len(dropped) == 0:
        return None  # not applied (no weights): the warning at the top says so
    series = [("kept", kept, KEPT_COLOR), ("dropped", dropped, DROPPED_COLOR)]
    return histogram(f"hist-{name}", series, np.linspace(0, 1, 21), f"{name}: NSFW score", float(sc.get("threshold", 0.8)))


def _face_chart(run: RunData, sc: dict) -> str | None:
    name = sc["name"]
    t = run.stage_output(name, ["face_probs"])
    probs = pc.list_flatten(t.column("face_probs")).to_numpy(zero_copy_only=False) if t is not None else np.zeros(0)
    if len(probs) == 0:
        return None
    threshold = float(sc.get("prob_threshold", 0.9))
    lo = 0.5 if threshold >= 0.5 else 0.0
    note = "every blurred face; MTCNN reports only faces at or above the threshold, so nothing lies left of it"
    return histogram(f"hist-{name}", [("blurred faces", probs, PALETTE[3])], np.linspace(lo, 1, 21), f"{name}: face probability", threshold, None, note)


CHARTS = {"nsfw": _nsfw_chart, "face_blur": _face_chart, "phash_dedup": _dedup_chart, "pca_hash": _dedup_chart,
          "copy_dedup": _dedup_chart, "decontaminate": _dedup_chart}


def scores_section(run: RunData) -> str:
    charts = [c for sc in run.stage_configs if sc["kind"] in CHARTS for c in [CHARTS[sc["kind"]](run, sc)] if c]
    if not charts:
        return section("scores", "Scores and thresholds", None, "No stage with a score threshold (nsfw, face_blur, phash_dedup, pca_hash, copy_dedup, decontaminate) produced scores in this run.")
    return section("scores", "Scores and thresholds", f'<div class="charts">{"".join(charts)}</div>', "")


# -- sizes of kept and dropped images --------------------------------------------------------------
def sizes_section(run: RunData) -> str:
    decode = next((sc for sc in run.stage_configs if sc["kind"] == "decode"), None)
    kept_t = run.dataset([schema.UID, schema.WIDTH, schema.HEIGHT])
    if decode is None or schema.WIDTH not in kept_t.column_names:
        return section("sizes", "Sizes and aspect ratios", None, "No decode stage ran, so image sizes are unknown.")
    kept_uids = kept_t.column(schema.UID)
    sizes = {"kept": (kept_t.column(schema.WIDTH).to_numpy(zero_copy_only=False), kept_t.column(schema.HEIGHT).to_numpy(zero_copy_only=False))}
    w, h = [], []
    decoded = run.stage_output(decode["name"], [schema.WIDTH, schema.HEIGHT])
    if decoded is not None:
        later = decoded.filter(pc.invert(pc.is_in(decoded.column(schema.UID), kept_uids)))
        w += later.column(schema.WIDTH).to_pylist()
        h += later.column(schema.HEIGHT).to_pylist()
    at_decode = run.drops(["stage", "details"])
    at_decode = at_decode.filter(pc.equal(at_decode.column("stage"), decode["name"]))
    for d in at_decode.column("details").to_pylist():
        info = json.loads(d) if d else {}
        if isinstance(info, dict) and "width" in info and "height" in info:
            w.append(info["width"])
            h.append(info["height"])
    sizes["dropped"] = (np.array(w, np.float64), np.array(h, np.float64))
    short = {k: np.minimum(a, b).astype(np.float64) for k, (a, b) in sizes.items()}
    aspect = {k: (np.maximum(a, b) / np.maximum(np.minimum(a, b), 1)).astype(np.float64) for k, (a, b) in sizes.items()}
    series = lambda d: [("kept", d["kept"], KEPT_COLOR), ("dropped", d["dropped"], DROPPED_COLOR)]  # noqa: E731
    charts = [
        histogram("hist-short-side", series(short), 2.0 ** np.arange(3, 13.5, 0.5), "shorter side (pixels, log scale)",
                  float(decode.get("min_side", 64)), f"min_side {decode.get('min_side', 64)}",
                  "dropped: images decode rejected for their size plus images that later stages dropped", "{:.0f}"),
        histogram("hist-aspect", series(aspect), 2.0 ** np.arange(0, 3.51, 0.25), "aspect ratio: longer / shorter side (log scale)",
                  float(decode.get("max_aspect_ratio", 6.0)), f"max_aspect_ratio {decode.get('max_aspect_ratio', 6.0)}", "", "{:.2g}"),
    ]
    return section("sizes", "Sizes and aspect ratios of kept and dropped images", f'<div class="charts">{"".join(charts)}</div>', "")


# -- the funnel of every source ----------------------------------------------------------------------
def sources_section(run: RunData) -> str:
    t = run.ledger([schema.SOURCE, "stage", "decision"])
    if t.num_rows == 0:
        return section("sources", "Funnel per source", None, "The ledger is empty.")
    order = [s["stage"] for s in run.manifest.get("stages", [])]
    per: dict[str, Counter] = defaultdict(Counter)
    for src, stage, decision in zip(*(t.column(c).to_pylist() for c in (schema.SOURCE, "stage", "decision"))):
        per[src or "?"]["kept" if decision == "kept" else stage] += 1
    stages = [s for s in order if any(c[s] for c in per.values())]
    stages += sorted({k for c in per.values() for k in c} - set(stages) - {"kept"})
    color = {s: STAGE_COLORS[i % len(STAGE_COLORS)] for i, s in enumerate(stages)}
    rows, bars = [], []
    for src in sorted(per, key=lambda s: (-sum(per[s].values()), s)):
        c = per[src]
        total = sum(c.values())
        rows.append([src, f"{total:,}", *[f"{c[s]:,}" for s in stages], f"{c['kept']:,}", f"{100 * c['kept'] / total:.1f}%"])
        segs = [("kept", c["kept"], KEPT_COLOR)] + [(f"dropped at {s}", c[s], color[s]) for s in stages]
        cells = "".join(f'<i style="width:{100 * n / total:.2f}%;background:{col}" title="{esc(label)}: {n:,}"></i>' for label, n, col in segs if n)
        bars.append(f'<div class="src-bar"><span>{esc(short_key(src))}</span><div class="bar">{cells}</div></div>')
    legend = f'<div class="legend"><span class="key"><i style="background:{KEPT_COLOR}"></i>kept</span>' + "".join(
        f'<span class="key"><i style="background:{color[s]}"></i>dropped at {esc(s)}</span>' for s in stages) + "</div>"
    headers = ["source", "input", *[f"dropped at {s}" for s in stages], "kept", "kept %"]
    return section("sources", "Funnel per source", "".join(bars) + legend + table(headers, rows, set(range(1, len(headers)))), "")
