"""Star against connected components on the quality set (used by dedup_quality.py).

Both rules start from the same candidate edges. ``components`` keeps one image per connected
component, so a chain A~B~C drops C as a copy of A however unlike they are; ``star`` keeps the
best remaining image and drops only the images that pass the stage's own test against it. For
each rule: pair precision and recall of "dropped in place of the same kept image" against the
true groups, the drops whose direct score to the image kept in their place fails the test
(star: 0 by construction, and counted here rather than assumed), and the drops of images that
are not copies of what was kept (distractors and hard negatives among them).
"""

from __future__ import annotations

import numpy as np

from curation.dedup.components import connected_components, pick_keepers
from curation.dedup.grouping import star_keepers


def pairs_of_groups(labels: np.ndarray) -> set[tuple[int, int]]:
    order = np.argsort(labels, kind="stable")
    g = labels[order]
    bounds = np.flatnonzero(np.r_[True, g[1:] != g[:-1], True])
    out = set()
    for a, b in zip(bounds[:-1], bounds[1:]):
        m = sorted(order[a:b].tolist())
        out.update((m[i], m[j]) for i in range(len(m)) for j in range(i + 1, len(m)))
    return out


def scores(pred: set, truth: set) -> dict:
    tp = len(pred & truth)
    p = tp / len(pred) if pred else 1.0
    r = tp / len(truth) if truth else 1.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 4), "predicted_pairs": len(pred), "true_positive_pairs": tp}


def phash_test(phash: np.ndarray, phash_flip: np.ndarray, radius: int):
    """phash_dedup's test with ``flip``: the smallest Hamming distance over the mirror combinations."""
    p, f = np.asarray(phash, np.uint64), np.asarray(phash_flip, np.uint64)

    def distance(kept, cand):
        cand = np.asarray(cand)
        combos = (p[cand] ^ p[kept], p[cand] ^ f[kept], f[cand] ^ p[kept], f[cand] ^ f[kept])
        return np.min([np.bitwise_count(c) for c in combos], axis=0)

    return (lambda kept, cand: distance(kept, cand) <= radius), f"Hamming <= {radius}"


def cosine_test(x: np.ndarray, threshold: float):
    return (lambda kept, cand: x[np.asarray(cand)] @ x[kept] > threshold), f"cosine > {threshold}"


def compare(name: str, src, dst, items: list[dict], truth: set, test) -> list[dict]:
    passes, rule = test
    n = len(items)
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    labels = connected_components(n, src, dst)
    area = np.array([it["area"] for it in items], np.float64)
    uid = np.arange(n)
    group = np.array([it["group"] for it in items])
    kind = np.array([it["transform"] for it in items])
    rows = []
    for grouping, keeper in (("components", pick_keepers(labels, area, uid)), ("star", star_keepers(labels, area, uid, passes))):
        dropped = np.flatnonzero(keeper != uid)
        kept = keeper[dropped]
        fails = sum(int(not passes(int(k), np.array([d]))[0]) for d, k in zip(dropped, kept))
        wrong = group[dropped] != group[kept]
        # images dropped in place of one kept image are predicted copies of it and of each other
        pairs = scores(pairs_of_groups(keeper), truth)
        rows.append({
            "method": name, "grouping": grouping, "test": rule,
            "precision": pairs["precision"],
            "recall": pairs["recall"],
            "drops": int(len(dropped)),
            "drops_failing_the_test_against_their_kept_image": fails,
            "distinct_images_dropped": int(wrong.sum()),
            "distractors_dropped": int(np.sum(kind[dropped] == "distractor")),
            "hard_negatives_dropped": int(np.sum(kind[dropped] == "hard_negative")),
        })
    return rows


def print_grouping(rows: list[dict]) -> None:
    print(f"\n{'method':34s} {'grouping':10s} {'P':>6s} {'R':>6s} {'drops':>6s} {'fail test':>9s} {'distinct':>8s} {'hard neg':>8s}")
    for r in rows:
        print(f"{r['method'][:34]:34s} {r['grouping']:10s} {r['precision']:6.3f} {r['recall']:6.3f} {r['drops']:6d} "
              f"{r['drops_failing_the_test_against_their_kept_image']:9d} {r['distinct_images_dropped']:8d} {r['hard_negatives_dropped']:8d}")
