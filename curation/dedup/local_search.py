"""Candidate copy pairs from a k-NN search of local descriptors, and their verification.

Every keypoint descriptor of every image is a point of one search, cut into coarse lists like an
IVF index: a descriptor is stored in its nearest list and searched, as a query, in its
``list_probe`` nearest lists (with mirroring, the mirrored descriptor is a query too, never
stored). A query's ``neighbours`` nearest stored descriptors of *other* images above
``min_similarity`` each vote for the pair (query image, neighbour image); each image proposes its
``max_candidates`` partners with the most votes (at least ``min_votes``); the union of proposals
is verified geometrically (``geometry.verify_pair``) and verified pairs are the copy edges.

Templates do not vote: a descriptor whose near matches lie in more than ``max_recurrence`` other
images is a visual element that recurs across unrelated images (an app's frame around
screenshots, a watermark, the same emoji or font), the burstiness of Jégou et al. (CVPR 2009).
Copies of one image share *all* their keypoints with each other; a template shares a few with
many images. The price: a group of more than ``max_recurrence`` + 1 copies of one image is left
to the hash stages, which run first and catch the near-exact ones.

Both execution forms call the same functions on the same lists in the same canonical order
(``search_list`` sorts its inputs), so with equal coarse lists they give equal candidates: the
single-task form loops over the lists in one process (``find_copies``), the partitioned form
runs one reduce task per partition of lists (``local_steps``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curation.dedup.geometry import Verdict, VerifySettings, verify_pair
from curation.dedup.local_features import MIRROR_PERMUTATION, Features
from curation.partitioned.keys import combine, mix64
from retrieval.index import knn_search
from retrieval.kmeans import kmeans

TRAIN_SALT = 0x10CA1
QUERY_CHUNK = 4096
SIMS_BUDGET = 1 << 24  # similarities held at once by one list search (64 MB of float32)


class CandidateSearch(BaseModel):
    """The descriptor k-NN search that proposes candidate pairs."""

    model_config = ConfigDict(extra="forbid")

    max_keypoints: int = Field(256, ge=8, description="strongest keypoints of each image used (at most what local_features stored)")
    neighbours: int = Field(16, ge=1, description="nearest descriptors of other images searched per descriptor")
    min_similarity: float = Field(0.9, ge=-1, le=1, description="cosine of two descriptors below which they do not vote")
    max_recurrence: int = Field(10, ge=1, description="a descriptor matched in more other images than this is a template "
                                "(app frame, watermark, overlaid emoji or text) and does not vote; below `neighbours`")
    min_votes: int = Field(4, ge=1, description="votes (distinct keypoints) a partner needs to become a candidate")
    max_candidates: int = Field(16, ge=1, description="candidate partners each image proposes, most votes first")
    list_size: int = Field(1000, ge=16, description="target descriptors per coarse list")
    list_probe: int = Field(2, ge=1, description="coarse lists each descriptor is searched in (all lists = exact)")
    train_points_per_list: int = Field(32, ge=1, description="sample size of the coarse quantizer per list")
    max_lists: int = Field(65_536, ge=1, description="cap on the coarse lists")

    @model_validator(mode="after")
    def _recurrence_below_neighbours(self) -> "CandidateSearch":
        if self.max_recurrence >= self.neighbours:
            raise ValueError(f"max_recurrence ({self.max_recurrence}) must be below neighbours ({self.neighbours}), "
                             "or a template could never be seen")
        return self


@dataclass
class Points:
    """Descriptors of many images: image uid, keypoint index, mirrored (query only), vectors."""

    uid: np.ndarray
    kp: np.ndarray
    mirrored: np.ndarray
    desc: np.ndarray  # uint8 [n, bytes]

    def __len__(self) -> int:
        return len(self.uid)

    def take(self, idx) -> "Points":
        return Points(self.uid[idx], self.kp[idx], self.mirrored[idx], self.desc[idx])

    @property
    def key(self) -> np.ndarray:
        """A hash of (uid, kp), the sample key of a stored descriptor."""
        return combine(mix64(self.uid), self.kp)

    def vectors(self) -> np.ndarray:
        f = Features(0, 0, np.zeros((len(self), 2), np.float32), self.desc)
        return f.vectors()


def points_of(uids: np.ndarray, feats: list[Features | None], max_keypoints: int, mirror: bool) -> Points:
    """The stored descriptors (the first ``max_keypoints`` of each image) and, with ``mirror``,
    their mirrored copies (RootSIFT only; ORB has no mirror permutation)."""
    u, k, m, d = [], [], [], []
    for uid, f in zip(uids, feats):
        if f is None or len(f) == 0:
            continue
        f = f.head(max_keypoints)
        n = len(f)
        u.append(np.full(n, uid, np.int64))
        k.append(np.arange(n, dtype=np.int32))
        m.append(np.zeros(n, bool))
        d.append(f.desc)
        if mirror and not f.binary:
            u.append(np.full(n, uid, np.int64))
            k.append(np.arange(n, dtype=np.int32))
            m.append(np.ones(n, bool))
            d.append(f.desc[:, MIRROR_PERMUTATION])
    if not u:
        return Points(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, bool), np.zeros((0, 128), np.uint8))
    return Points(np.concatenate(u), np.concatenate(k), np.concatenate(m), np.concatenate(d))


# -- coarse lists ------------------------------------------------------------------------------
def estimated_lists(n_images: int, s: CandidateSearch) -> int:
    return max(1, min(s.max_lists, math.ceil(n_images * s.max_keypoints / s.list_size)))


def train_rate(n_images: int, s: CandidateSearch) -> float:
    """Sampling rate of stored descriptors for the quantizer; depends only on the image count,
    which both forms know before reading any descriptor."""
    bound = max(1, n_images * s.max_keypoints)
    return min(1.0, s.train_points_per_list * estimated_lists(n_images, s) / bound)


def train_mask(p: Points, rate: float, seed: int) -> np.ndarray:
    if rate >= 1.0:
        return ~p.mirrored
    threshold = np.uint64(min(int(rate * 2.0**64), 2**64 - 1))
    return ~p.mirrored & (mix64(p.key, seed ^ TRAIN_SALT) < threshold)


def fit_lists(sample: Points, stored: int, s: CandidateSearch, seed: int, gpu: str = "auto") -> np.ndarray | None:
    """Centroids of the coarse lists (None: one list) from the sampled descriptors, ordered by
    (uid, kp) so that the fit does not depend on how the sample was gathered."""
    lists = min(s.max_lists, math.ceil(stored / s.list_size), len(sample))
    if lists <= 1:
        return None
    order = np.lexsort((sample.kp, sample.uid))
    x = sample.take(order).vectors()
    return kmeans(x, lists, niter=20, seed=seed, spherical=True, gpu=gpu, max_points_per_centroid=max(256, s.train_points_per_list)).centroids


def assign_lists(p: Points, centroids: np.ndarray | None, probe: int, gpu: str = "auto") -> np.ndarray:
    """int64 [n, probe'] lists each point is searched in, nearest first (column 0 = where a
    stored point lives)."""
    if centroids is None or len(p) == 0:
        return np.zeros((len(p), 1), np.int64)
    probe = min(probe, len(centroids))
    _, nearest = knn_search(centroids, p.vectors(), probe, spec="Flat", gpu=gpu)
    return nearest


# -- search ------------------------------------------------------------------------------------
@dataclass
class Candidates:
    """(query uid, query keypoint, query mirrored) -> (neighbour uid, neighbour keypoint, sim)."""

    q_uid: np.ndarray
    q_kp: np.ndarray
    q_mir: np.ndarray
    n_uid: np.ndarray
    n_kp: np.ndarray
    sim: np.ndarray

    @staticmethod
    def concat(parts: list["Candidates"]) -> "Candidates":
        if not parts:
            z = np.zeros(0, np.int64)
            return Candidates(z, z.astype(np.int32), z.astype(bool), z, z.astype(np.int32), z.astype(np.float32))
        return Candidates(*(np.concatenate([getattr(c, f) for c in parts]) for f in ("q_uid", "q_kp", "q_mir", "n_uid", "n_kp", "sim")))

    def __len__(self) -> int:
        return len(self.q_uid)


def _canonical(p: Points) -> Points:
    return p.take(np.lexsort((p.mirrored, p.kp, p.uid)))


def search_list(db: Points, queries: Points, s: CandidateSearch) -> Candidates:
    """Per query, its ``neighbours`` nearest stored points of other images above
    ``min_similarity``, by exact inner product (ties: smaller neighbour uid, then keypoint)."""
    if len(db) == 0 or len(queries) == 0:
        return Candidates.concat([])
    db, queries = _canonical(db), _canonical(queries)
    xb = db.vectors()
    k = min(s.neighbours, len(db))
    out = []
    chunk = max(256, min(QUERY_CHUNK, SIMS_BUDGET // len(db)))  # bounds the [chunk, len(db)] matrix
    for start in range(0, len(queries), chunk):
        q = queries.take(slice(start, start + chunk))
        sims = q.vectors() @ xb.T
        sims[q.uid[:, None] == db.uid[None, :]] = -np.inf
        sims[sims <= s.min_similarity] = -np.inf
        if k < len(db):
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(len(db)), (len(q), len(db)))
        top_sim = np.take_along_axis(sims, top, axis=1)
        rows, cols = np.nonzero(np.isfinite(top_sim))
        j = top[rows, cols]
        out.append(Candidates(q.uid[rows], q.kp[rows], q.mirrored[rows], db.uid[j], db.kp[j], top_sim[rows, cols].astype(np.float32)))
    return Candidates.concat(out)


def top_neighbours(c: Candidates, k: int) -> Candidates:
    """The ``k`` best candidates of each query point over every list it was searched in."""
    if len(c) == 0:
        return c
    order = np.lexsort((c.n_kp, c.n_uid, -c.sim, c.q_mir, c.q_kp, c.q_uid))
    c = Candidates(*(getattr(c, f)[order] for f in ("q_uid", "q_kp", "q_mir", "n_uid", "n_kp", "sim")))
    new = np.r_[True, (c.q_uid[1:] != c.q_uid[:-1]) | (c.q_kp[1:] != c.q_kp[:-1]) | (c.q_mir[1:] != c.q_mir[:-1])]
    starts = np.flatnonzero(new)
    rank = np.arange(len(c)) - np.repeat(starts, np.diff(np.r_[starts, len(c)]))
    keep = rank < k
    return Candidates(*(getattr(c, f)[keep] for f in ("q_uid", "q_kp", "q_mir", "n_uid", "n_kp", "sim")))


def proposals(c: Candidates, s: CandidateSearch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query image, partner image, votes): each query image's ``max_candidates`` partners with
    the most votes (distinct query keypoints, mirrored ones separately), at least ``min_votes``."""
    c = top_neighbours(c, s.neighbours)
    if len(c) == 0:
        z = np.zeros(0, np.int64)
        return z, z, z
    voter = np.stack([c.q_uid, c.n_uid, c.q_kp.astype(np.int64) * 2 + c.q_mir], 1)
    voter = np.unique(voter, axis=0)  # one vote per (query keypoint, partner image)
    # Templates: a query keypoint whose near matches span more than max_recurrence images.
    _, inv, spread = np.unique(voter[:, [0, 2]], axis=0, return_inverse=True, return_counts=True)
    voter = voter[spread[inv.reshape(-1)] <= s.max_recurrence]
    pairs, votes = np.unique(voter[:, :2], axis=0, return_counts=True)
    q, n = pairs[:, 0], pairs[:, 1]
    ok = votes >= s.min_votes
    q, n, votes = q[ok], n[ok], votes[ok]
    order = np.lexsort((n, -votes, q))
    q, n, votes = q[order], n[order], votes[order]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]]) if len(q) else np.zeros(0, np.int64)
    rank = np.arange(len(q)) - np.repeat(starts, np.diff(np.r_[starts, len(q)]))
    keep = rank < s.max_candidates
    return q[keep], n[keep], votes[keep]


def unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int64 [m, 2] distinct (smaller uid, larger uid) pairs, sorted."""
    if len(a) == 0:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0)


# -- the single-task form ----------------------------------------------------------------------
def search_all(p: Points, lists: np.ndarray, s: CandidateSearch) -> Candidates:
    """Every list searched in one process: the same per-list search as the partitioned form."""
    stored = ~p.mirrored
    primary = lists[:, 0]
    flat_list = lists.reshape(-1)
    flat_point = np.repeat(np.arange(len(p)), lists.shape[1])
    order = np.argsort(flat_list, kind="stable")
    flat_list, flat_point = flat_list[order], flat_point[order]
    bounds = np.flatnonzero(np.r_[True, flat_list[1:] != flat_list[:-1], True]) if len(flat_list) else np.zeros(1, np.int64)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        lst = flat_list[a]
        queries = flat_point[a:b]
        db = queries[stored[queries] & (primary[queries] == lst)]
        out.append(search_list(p.take(db), p.take(queries), s))
    return Candidates.concat(out)


@dataclass
class CopySearch:
    """Candidate pairs (smaller uid, larger uid), their verdicts, and what the search cost."""

    pairs: np.ndarray
    verdicts: list[Verdict]
    descriptors: int
    lists: int
    seconds: dict = field(default_factory=dict)

    @property
    def edges(self) -> np.ndarray:
        ok = np.array([v.ok for v in self.verdicts], bool)
        return self.pairs[ok] if len(self.pairs) else self.pairs

    def rejected(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.verdicts:
            if not v.ok:
                out[v.reason] = out.get(v.reason, 0) + 1
        return dict(sorted(out.items()))


def find_copies(uids: np.ndarray, feats: list[Features], n_rows: int, s: CandidateSearch, verify: VerifySettings,
                mirror: bool, seed: int, gpu: str = "auto") -> CopySearch:
    """The single-task form from features to verified pairs (``n_rows``: the rows the stage
    applies to, with or without features, which fixes the quantizer's sample rate)."""
    t0 = time.perf_counter()
    p = points_of(uids, feats, s.max_keypoints, mirror)
    stored = int((~p.mirrored).sum())
    centroids = fit_lists(p.take(train_mask(p, train_rate(n_rows, s), seed)), stored, s, seed, gpu)
    lists = assign_lists(p, centroids, s.list_probe, gpu)
    t1 = time.perf_counter()
    q, n, _ = proposals(search_all(p, lists, s), s)
    pairs = unique_pairs(q, n)
    t2 = time.perf_counter()
    pos = {int(u): i for i, u in enumerate(uids)}
    verdicts = [verify_pair(feats[pos[int(a)]], feats[pos[int(b)]], verify, mirror) for a, b in pairs]
    seconds = {"quantizer": round(t1 - t0, 3), "search": round(t2 - t1, 3), "verify": round(time.perf_counter() - t2, 3)}
    return CopySearch(pairs, verdicts, stored, 1 if centroids is None else len(centroids), seconds)
