"""Local-feature copy detection and the weight-free pipeline inside benchmarks/dedup_quality.py.

* ``local_features_of``: the ``local_features`` stage's own extraction on every file, timed in
  CPU seconds (one OpenCV thread, as the stage runs one actor per CPU).
* ``local_methods``: ``local_copy_dedup``'s single-task search (``curation.dedup.local_search.
  find_copies``) at its defaults, alone and combined with the ``phash_dedup`` default edges: the
  ``offline`` pipeline runs phash_dedup first and local_copy_dedup on what is left, and one image
  of every phash group survives, so its groups are the components of the union of both edge sets.
* ``hard_negative_photos``: real photos of the same class (a Caltech-101 category, a clothing
  type), each its own group: different photos of one kind of object, often of one scene (the
  same bedspread, the same studio, the same printed sign), which must not be linked.
* ``drop_counts``: how many distractors and hard negatives the keep rule would drop.
"""

from __future__ import annotations

import random
import resource
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from curation.dedup.components import connected_components, pick_keepers
from curation.stages.local_copy_dedup import LocalCopyDedupConfig


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (imagededup may use a pool)."""
    own = time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + kids.ru_utime + kids.ru_stime


def local_features_of(folder: Path, items: list[dict]) -> tuple[list, float]:
    """(features per item, CPU seconds) through the stage's decode + extraction."""
    import cv2

    from curation.stage import StageContext
    from curation.stages.local_features import LocalFeaturesConfig, LocalFeaturesStage

    stage = LocalFeaturesStage(LocalFeaturesConfig(kind="local_features"), StageContext(folder, folder))
    stage.setup()
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    t0 = cpu_seconds()
    feats = [stage.features((folder / it["file"]).read_bytes()) for it in items]
    cpu = cpu_seconds() - t0
    cv2.setNumThreads(threads)
    min_kp = stage.config.min_keypoints
    return [f if len(f) >= min_kp else None for f in feats], cpu


def local_methods(feats: list, items: list[dict], truth: set, hash_edges: tuple, feature_cpu: float, evaluate, hash_keeper) -> list[dict]:
    """``local_copy_dedup`` at its defaults, and the offline pipeline (phash_dedup + it) as
    ``offline.yaml`` runs it: pHash stars (``hash_keeper``), then local-feature stars among the
    images pHash kept (each drop verified against its kept image), chained to the final kept
    image; and, for comparison, the union of both stages' edges as connected components. (The
    candidate search runs once over every image; the pipeline's second stage searches the pHash
    survivors only, so its per-image candidate cap may pick slightly different partners.)"""
    from curation.dedup.local_search import find_copies

    cfg = LocalCopyDedupConfig(kind="local_copy_dedup")
    n = len(items)
    idx = np.array([i for i, f in enumerate(feats) if f is not None], np.int64)
    t0 = cpu_seconds()
    found = find_copies(idx, [feats[i] for i in idx], n, cfg.search, cfg.verify, cfg.mirror, seed=0, gpu="never")
    total_cpu = cpu_seconds() - t0
    wall = sum(found.seconds.values())
    verify_cpu = total_cpu * found.seconds["verify"] / wall if wall else 0.0  # CPU split as the wall time splits
    edges = found.edges
    cost = {
        "cpu_ms_per_image": round(1000 * feature_cpu / n, 2),
        "search_cpu_ms_per_image": round(1000 * (total_cpu - verify_cpu) / n, 2),
        "verify_cpu_ms_per_pair": round(1000 * verify_cpu / max(1, len(found.pairs)), 3),
        "candidate_pairs": int(len(found.pairs)),
        "too_few_keypoints": int(n - len(idx)),
        "rejected": found.rejected(),
    }
    local = evaluate("ours local features (local_copy_dedup default)", n, edges[:, 0], edges[:, 1], items, truth, wall,
                     "local-features", {"search": cfg.search.model_dump(), "verify": cfg.verify.model_dump(), "mirror": cfg.mirror})
    hi, hj = hash_edges
    src, dst = np.concatenate([hi, edges[:, 0]]), np.concatenate([hj, edges[:, 1]])
    chained = evaluate("ours offline stages, grouping: components", n, src, dst, items, truth, wall,
                       "offline-pipeline-components", {"phash_dedup": "default", "local_copy_dedup": "default", "grouping": "components"})
    offline = evaluate("ours offline pipeline (offline.yaml: pHash stars with its band, then local-feature stars)", n, src, dst, items, truth, wall,
                       "offline-pipeline", {"phash_dedup": "offline.yaml", "local_copy_dedup": "offline.yaml", "grouping": "star"},
                       keeper=pipeline_keeper(feats, edges, hash_keeper, items, cfg))
    for r in (local, chained, offline):
        r.update(cost)
        r["feature_seconds"] = round(feature_cpu, 2)
    return [local, chained, offline]


def pipeline_keeper(feats: list, edges: np.ndarray, hash_keeper: np.ndarray, items: list[dict], cfg) -> np.ndarray:
    """The image each one ends up kept in place of after pHash stars then local-feature stars."""
    from curation.dedup.grouping import star_keepers
    from curation.dedup.local_steps import DirectVerdicts

    n = len(items)
    alive = hash_keeper == np.arange(n)
    e = edges[alive[edges[:, 0]] & alive[edges[:, 1]]]
    labels = connected_components(n, e[:, 0], e[:, 1])
    passes = DirectVerdicts(cfg.verify, cfg.mirror, feats, relay_overlap=cfg.relay_overlap).passes  # the stage's own star test
    local_keeper = star_keepers(labels, np.array([it.get("area", 0) for it in items], np.float64), np.arange(n), passes)
    return local_keeper[hash_keeper]  # a pHash drop follows its kept image into the second stage


def offline_hash_stage(hashes: dict, feats: list, items: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """``phash_dedup`` as ``pipelines/offline.yaml`` configures it (radius, flip, star, and its
    band: pairs beyond ``accept_within`` bits verified with local features), through the stage's
    own pieces: (edge rows i, j, the image each one is kept in place of, the config)."""
    import yaml

    from curation.dedup.binary import uint64_to_codes
    from curation.dedup.grouping import star_keepers
    from curation.dedup.hash_band import HashBandRule
    from curation.stage import StageContext
    from curation.stages.phash_dedup import PhashDedupConfig, PhashDedupStage

    spec = next(s for s in yaml.safe_load((Path(__file__).parents[1] / "pipelines" / "offline.yaml").read_text())["stages"]
                if s["kind"] == "phash_dedup")
    cfg = PhashDedupConfig(**spec)
    stage = PhashDedupStage(cfg, StageContext(Path("."), Path(".")))
    n, uids = len(items), np.arange(len(items), dtype=np.int64)
    codes, flipped = uint64_to_codes(hashes["phash"]), uint64_to_codes(hashes["phash_flip"])
    area = np.array([it.get("area", 0) for it in items], np.float64)
    if cfg.band is None:
        raise ValueError("offline.yaml's phash_dedup has no band")
    rule = HashBandRule(cfg.band, cfg.radius, feats, uids, lambda d, k: stage.distance(codes, flipped, d, k), stage._within(codes, flipped))
    g = rule.single_task(np.vstack([codes, flipped]), np.tile(uids, 2), cfg.index, star=True)
    keeper = star_keepers(connected_components(n, g.i, g.j), area, uids, g.passes)
    return g.i, g.j, keeper, spec


def hard_negative_photos(photos: list[Path], count: int, rng: random.Random) -> list[Path]:
    """``count`` photos in pairs of the same class folder (Caltech-101 category, clothing type),
    from ``photos`` (already unused by the planted set)."""
    by_class: dict[str, list[Path]] = defaultdict(list)
    for p in photos:
        if p.parent.parent.name in ("pool_caltech101", "clothing_cc0") and p.parent.name != "BACKGROUND_Google":
            by_class[f"{p.parent.parent.name}/{p.parent.name}"].append(p)
    classes = sorted(c for c, v in by_class.items() if len(v) >= 2)
    rng.shuffle(classes)
    out: list[Path] = []
    while len(out) + 2 <= count and classes:
        for c in list(classes):
            if len(out) + 2 > count:
                break
            members = by_class[c]
            if len(members) < 2:
                classes.remove(c)
                continue
            out += [members.pop(rng.randrange(len(members))), members.pop(rng.randrange(len(members)))]
    return out


def drop_counts(n: int, src, dst, items: list[dict], keeper=None) -> dict:
    """Distractors and hard negatives that the keep rule (largest area, then first), or
    ``keeper`` (star grouping), drops in place of an image of another group (a labelled source
    duplicate dropped in place of its twin is a right drop)."""
    if keeper is None:
        labels = connected_components(n, np.asarray(src, np.int64), np.asarray(dst, np.int64))
        area = np.array([it.get("area", 0) for it in items], np.float64)
        keepers = pick_keepers(labels, area, np.arange(n))
    else:
        keepers = np.asarray(keeper)
    group = np.array([it["group"] for it in items])
    dropped = group[keepers] != group
    kind = np.array([it["transform"] for it in items])
    out = {}
    for name in ("distractor", "hard_negative"):
        mask = kind == name
        out[f"{name}s_dropped"] = int((dropped & mask).sum())
        out[f"{name}s_dropped_fraction"] = round(float((dropped & mask).sum() / max(1, mask.sum())), 5)
    return out


def precision_by_transform(pairs: set, truth: set, items: list[dict]) -> dict:
    """Per transformation: the precision of predicted pairs with a copy of that transformation."""
    hits: dict[str, list[int]] = defaultdict(list)
    for a, b in pairs:
        for t in {items[a]["transform"], items[b]["transform"]} - {"original", "distractor"}:
            hits[t].append(int((a, b) in truth))
    return {t: round(float(np.mean(v)), 4) for t, v in sorted(hits.items())}
