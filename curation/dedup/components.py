"""Connected components of an edge list, and the rule that picks each component's keeper."""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as _scipy_components


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes given undirected edges ``src[i] -- dst[i]``.

    Labels are canonical: numbered 0.. in order of each component's smallest node, so the
    result does not depend on edge order. Linear in n + edges (scipy's sparse-graph search,
    the array equivalent of a disjoint-set pass).
    """
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    if len(src) != len(dst):
        raise ValueError("src and dst must have the same length")
    if n == 0:
        return np.zeros(0, np.int64)
    if len(src) and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n)).tocsr()
    _, raw = _scipy_components(graph, directed=True, connection="weak")
    # Canonical numbering: first occurrence order of raw labels over nodes 0..n-1.
    _, first = np.unique(raw, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[raw]


def component_sizes(labels: np.ndarray) -> np.ndarray:
    """Size of the component each node belongs to."""
    counts = np.bincount(labels)
    return counts[labels]


def pick_keepers(labels: np.ndarray, area: np.ndarray, uid: np.ndarray) -> np.ndarray:
    """Index of the kept node of each node's component.

    The documented keep rule: largest ``width * height`` (the best copy for training), ties
    broken by the smallest ``uid`` (the first occurrence in ingest order), so the choice is
    deterministic and independent of the index used.
    """
    labels = np.asarray(labels, np.int64)
    order = np.lexsort((np.asarray(uid, np.int64), -np.asarray(area, np.float64), labels))
    first_of_label = order[np.r_[True, labels[order][1:] != labels[order][:-1]]]
    keeper_by_label = np.empty(labels.max() + 1 if len(labels) else 0, np.int64)
    keeper_by_label[labels[first_of_label]] = first_of_label
    return keeper_by_label[labels]
