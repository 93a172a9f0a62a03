"""The partitioned form of local-feature copy detection, and the pair verification it shares with
``copy_dedup``'s ambiguous band.

    sample (map: sampled stored descriptors + a descriptor count per task)
    -> quantizer (aggregate: spherical k-means, the coarse lists)
    -> assign (map: every descriptor to its lists; stored in the nearest, a query in all)
    -> search (reduce per partition of lists: each list's exact top-k of other images)
    -> merge (reduce per partition of query images: top-k over lists, votes, each image's
       candidate partners) -> requests keyed by the group of each pair's two images
    -> ship (map with the requests as side input: an image's features to the partition of
       each of its candidate pairs) -> verify (reduce per partition of pairs: both images'
       features meet, RANSAC) -> edges -> components -> members -> keep

Where the keypoints travel: descriptors with their (uid, keypoint) go through the search; the
full features (coordinates + descriptors) stay in the stage's column until ``ship`` sends one
copy per candidate pair (at most ``2 * max_candidates`` per image on average) to the pair's
partition, and the members step sends them once more to their component for the keep rule.
Partitions of feature rows are sized by ``max_keypoints`` descriptors per row, so a task holds
about ``max_partition_rows`` descriptors whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curation import schema
from curation.dedup.band import CHECK, HI, LO, SCORE, GeometricCheck, merge_details, pair_requests
from curation.dedup.geometry import Verdict, VerifySettings, box_inside_share, homogeneous, inlier_support, verify_pair
from curation.dedup.local_features import column_features, from_row
from curation.dedup.local_search import (
    CandidateSearch,
    Candidates,
    Points,
    assign_lists,
    fit_lists,
    points_of,
    proposals,
    search_list,
    train_mask,
    train_rate,
    unique_pairs,
)
from curation.partitioned.components import edge_rows, star_forest
from curation.partitioned.files import with_partition
from curation.partitioned.keys import combine, mix64, partition_of
from curation.partitioned.steps import AggregateStep, Artifact, MapStep, Output, ReduceStep, TaskContext

FEATURE_ROW_WEIGHT = 256  # descriptors per feature row at local_features' default, for sizing partitions
_PAIR_SALT, _QUERY_SALT, _LIST_SALT = 0x9A1, 0x7E1, 0x115


# -- pair verification (shared with copy_dedup) --------------------------------------------------
def pair_partition(lo: np.ndarray, hi: np.ndarray, partitions: int) -> np.ndarray:
    return (combine(mix64(lo, _PAIR_SALT), hi) % np.uint64(max(1, partitions))).astype(np.int64)


@dataclass
class PairVerification:
    """Steps that verify requested pairs geometrically and turn them into ``verify/edges``
    (pairs accepted already, by ``direct_name``'s score, pass through unverified)."""

    check: GeometricCheck
    row_weight: int  # descriptors per feature row, for sizing partitions
    direct_name: str = "similarity"

    def steps(self, requests: str) -> list:
        features, weight, geo = self.check.features, self.row_weight, self.check

        def ship(table: pa.Table, ctx: TaskContext) -> dict:
            side = ctx.side.read() if ctx.side is not None else None
            if side is None or side.num_rows == 0:
                return {}
            uid, lo, hi = (side.column(c).to_numpy().astype(np.int64) for c in (schema.UID, LO, HI))
            score, check = side.column(SCORE).to_numpy(), side.column(CHECK).to_numpy(zero_copy_only=False)
            order = np.lexsort((-score, hi, lo, uid))  # a pair proposed from both sides: the higher score
            req = np.stack([uid, lo, hi], 1)[order]
            first = np.r_[True, (np.diff(req, axis=0) != 0).any(axis=1)]
            req, score, check = req[first], score[order][first], check[order][first]
            uids = table.column(schema.UID).to_numpy()
            pos = np.searchsorted(uids, req[:, 0], sorter=np.argsort(uids))
            idx = np.argsort(uids)[np.minimum(pos, len(uids) - 1)]
            if not np.array_equal(uids[idx], req[:, 0]):
                raise ValueError("a pair request names an image outside its group")
            feats = table.column(features).take(pa.array(idx)).combine_chunks()
            feats = pa.array([f if c else None for f, c in zip(feats.to_pylist(), check)], feats.type)
            out = pa.table({schema.UID: pa.array(req[:, 0]), LO: pa.array(req[:, 1]), HI: pa.array(req[:, 2]),
                            SCORE: pa.array(score, pa.float32()), CHECK: pa.array(check), features: feats})
            ctx.count("shipped_features", int(check.sum()))
            return {"pairs": with_partition(out, pair_partition(req[:, 1], req[:, 2], ctx.partitions["pairs"]))}

        def verify(part, ctx: TaskContext) -> dict:
            t = part.read()
            if t is None or t.num_rows == 0:
                return {}
            t = t.sort_by([(LO, "ascending"), (HI, "ascending"), (schema.UID, "ascending")])
            lo, hi, uid = (t.column(c).to_numpy() for c in (LO, HI, schema.UID))
            check = t.column(CHECK).to_numpy(zero_copy_only=False)
            rows = t.column(features).to_pylist()
            starts = np.flatnonzero(np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])])
            ea, eb = [], []
            for s, e in zip(starts, np.r_[starts[1:], len(lo)]):
                if not check[s]:
                    ctx.count("accepted_direct")
                    ea.append(lo[s])
                    eb.append(hi[s])
                    continue
                by_uid = {int(uid[i]): rows[i] for i in range(s, e)}
                verdict = geo.verdict(from_row(by_uid.get(int(lo[s]))), from_row(by_uid.get(int(hi[s]))))
                ctx.count("verified_pairs")
                if geo.accepts(verdict):
                    ctx.count("accepted_geometric" if verdict.ok else "accepted_without_features")
                    ea.append(lo[s])
                    eb.append(hi[s])
                else:
                    ctx.count(f"rejected:{verdict.reason}")
            leaf, root = star_forest(np.asarray(ea, np.int64), np.asarray(eb, np.int64))
            return {"edges": edge_rows(leaf, root, ctx.partitions["edges"])}

        return [
            MapStep("ship", ship, [Output("pairs", lambda s: s.partitions_for(s.dataset_rows.get(requests, 0) * weight))],
                    columns=(features,), side_input=requests),
            ReduceStep("verify", "ship/pairs", verify, [Output("edges", lambda s: s.partitions_for(s.dataset_rows.get(requests, 0)))]),
        ]


def verification_summary(counters: dict, direct_name: str = "similarity", without_features: str = "reject") -> dict:
    """The verification counts, with the single-task form's keys (``band.band_edges``)."""
    v = counters.get("verify", {})
    rejected = {k.split(":", 1)[1]: int(n) for k, n in v.items() if k.startswith("rejected:")}
    out = {
        "verified_pairs": int(v.get("verified_pairs", 0)),
        "edges_geometric": int(v.get("accepted_geometric", 0)),
        f"edges_{direct_name}": int(v.get("accepted_direct", 0)),
        "rejected": dict(sorted(rejected.items())),
    }
    if without_features == "accept":
        out["edges_without_features"] = int(v.get("accepted_without_features", 0))
    return out


# -- the candidate search ------------------------------------------------------------------------
def _points(table: pa.Table, features: str, s: CandidateSearch, mirror: bool) -> Points:
    return points_of(table.column(schema.UID).to_numpy(), column_features(table.column(features)), s.max_keypoints, mirror)


def _point_table(p: Points, **extra) -> pa.Table:
    d = p.desc.shape[1] if p.desc.ndim == 2 else 128
    desc = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(p.desc).reshape(-1), pa.uint8()), d)
    return pa.table({schema.UID: pa.array(p.uid), "kp": pa.array(p.kp, pa.int32()), "mirrored": pa.array(p.mirrored),
                     **{k: pa.array(v) for k, v in extra.items()}, "desc": desc})


def _read_points(t: pa.Table) -> Points:
    arr = t.column("desc").combine_chunks()
    desc = arr.values.to_numpy().reshape(len(arr), arr.type.list_size)
    return Points(t.column(schema.UID).to_numpy(), t.column("kp").to_numpy(), t.column("mirrored").to_numpy(zero_copy_only=False), desc)


def _candidate_table(c: Candidates, partitions: int) -> pa.Table:
    t = pa.table({"q_uid": pa.array(c.q_uid, pa.int64()), "q_kp": pa.array(c.q_kp, pa.int32()), "q_mir": pa.array(c.q_mir, pa.bool_()),
                  "n_uid": pa.array(c.n_uid, pa.int64()), "n_kp": pa.array(c.n_kp, pa.int32()), "sim": pa.array(c.sim, pa.float32())})
    return with_partition(t, partition_of(c.q_uid, partitions, salt=_QUERY_SALT))


def candidate_steps(features: str, s: CandidateSearch, mirror: bool, seed: int, gpu: str = "auto") -> list:
    """Steps from the features column to ``merge/requests`` (candidate pairs to verify)."""

    def sample(table: pa.Table, ctx: TaskContext) -> dict:
        valid = table.column(features).is_valid().to_numpy(zero_copy_only=False)
        ctx.count("rows_with_features", int(valid.sum()))
        ctx.count("too_few_keypoints", int((~valid).sum()))
        p = _points(table, features, s, mirror=False)
        mask = train_mask(p, train_rate(ctx.state.n_rows, s), seed)
        ctx.count("stored_descriptors", len(p))
        counts = with_partition(pa.table({"stored": pa.array([len(p)], pa.int64())}), 0)
        return {"train": with_partition(_point_table(p.take(mask)), 0), "counts": counts}

    def quantizer(inputs, ctx: TaskContext) -> Artifact:
        counts = inputs["sample/counts"].read()
        stored = int(np.sum(counts.column("stored").to_numpy())) if counts is not None else 0
        train = inputs["sample/train"].read()
        centroids = fit_lists(_read_points(train), stored, s, seed, gpu) if train is not None and stored else None
        lists = 1 if centroids is None else len(centroids)
        return Artifact({} if centroids is None else {"centroids": centroids}, {"lists": lists, "stored": stored})

    def assign(table: pa.Table, ctx: TaskContext) -> dict:
        art = ctx.artifacts("quantizer")
        p = _points(table, features, s, mirror)
        if len(p) == 0:
            return {}
        lists = assign_lists(p, art.arrays.get("centroids"), s.list_probe, gpu)
        rows = np.repeat(np.arange(len(p)), lists.shape[1])
        primary = np.tile(np.r_[True, np.zeros(lists.shape[1] - 1, bool)], len(p)) & ~p.mirrored[rows]
        lst = lists.reshape(-1)
        ctx.count("queries", len(rows))
        t = _point_table(p.take(rows), list=lst.astype(np.int64), primary=primary)
        return {"lists": with_partition(t, partition_of(lst, ctx.partitions["lists"], salt=_LIST_SALT))}

    def search(part, ctx: TaskContext) -> dict:
        t = part.read()
        if t is None or t.num_rows == 0:
            return {}
        lst = t.column("list").to_numpy()
        primary = t.column("primary").to_numpy(zero_copy_only=False)
        p = _read_points(t)
        order = np.argsort(lst, kind="stable")
        bounds = np.flatnonzero(np.r_[True, lst[order][1:] != lst[order][:-1], True])
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            rows = order[a:b]
            out.append(search_list(p.take(rows[primary[rows]]), p.take(rows), s))
            ctx.peak("list_rows", b - a)
        c = Candidates.concat(out)
        ctx.count("candidates", len(c))
        return {"candidates": _candidate_table(c, ctx.partitions["candidates"])} if len(c) else {}

    def merge(part, ctx: TaskContext) -> dict:
        t = part.read()
        if t is None or t.num_rows == 0:
            return {}
        c = Candidates(*(t.column(f).to_numpy(zero_copy_only=False) for f in ("q_uid", "q_kp", "q_mir", "n_uid", "n_kp", "sim")))
        q, n, votes = proposals(c, s)
        pairs = unique_pairs(q, n)
        ctx.count("proposals", len(q))
        if len(pairs) == 0:
            return {}
        check = np.ones(len(pairs), bool)
        score = np.zeros(len(pairs), np.float32)
        return {"requests": pair_requests(pairs[:, 0], pairs[:, 1], score, check, ctx)}

    def stored_rows(st) -> float:
        return st.n_rows * s.max_keypoints * s.list_probe * (2 if mirror else 1)

    return [
        MapStep("sample", sample, [Output("train", 1), Output("counts", 1)], columns=(features,)),
        AggregateStep("quantizer", ["sample/train", "sample/counts"], quantizer),
        MapStep("assign", assign, [Output("lists", lambda st: min(st.facts["quantizer"]["lists"], st.partitions_for(stored_rows(st))))],
                columns=(features,)),
        ReduceStep("search", "assign/lists", search,
                   [Output("candidates", lambda st: st.partitions_for(st.n_rows * s.max_keypoints * s.neighbours))]),
        ReduceStep("merge", "search/candidates", merge, [Output("requests", lambda st: st.n_groups)]),
    ]


# -- the keep rule's evidence ----------------------------------------------------------------------
class DirectVerdicts:
    """Verifies every dropped image against the image kept in its place, so that the ledger gives
    the evidence between the two, never that of some other member of the component. Verdicts are
    cached by (candidate, kept) index: the star rule's test (``passes``) and the ledger's
    evidence verify each pair once.

    With ``relay_overlap``, a candidate that fails against the kept image is still dropped in its
    place when it verifies against a *relay*, a member already dropped there, and the part of the
    relay it matches lies inside the part of the relay that matches the kept image (at least that
    share of its inliers' bounding box inside the relay's, and the relay's inliers against the kept
    image at least that share as dense there as over their box): a copy of that part of the relay
    is a copy of part of the kept image. (Box alone, two screenshots matching on their shared app
    frame have inliers around the page, and a photo inside one relayed to the other.) So a small
    re-encoded crop of a photo is dropped in place of a kept screenshot of that photo, whose
    downscaled features it is too small to meet directly; a photo is never dropped through a
    collage of it and another photo (it matches the other half of the collage from the half that
    matched the kept image). The ledger names the relay
    (``via_uid``), gives the candidate's inliers against it and the transform composed through
    it to the kept image."""

    MAX_RELAYS = 8  # relays tried per kept image, in keep order

    def __init__(self, settings: VerifySettings, mirror: bool, feats: list | None = None, uids: np.ndarray | None = None,
                 relay_overlap: float | None = None):
        self.settings, self.mirror = settings, mirror
        self.feats, self.uids = feats, uids
        self.relay_overlap = relay_overlap
        self.details: dict[int, dict] = {}
        self._verdicts: dict[tuple[int, int], object] = {}
        self._relays: dict[int, list[int]] = {}
        self._via: dict[tuple[int, int], int] = {}

    def verdict(self, d: int, k: int):
        key = (int(d), int(k))
        if key not in self._verdicts:
            self._verdicts[key] = verify_pair(self.feats[d], self.feats[k], self.settings, self.mirror)
        return self._verdicts[key]

    def passes(self, kept: int, cand: np.ndarray) -> np.ndarray:
        """The star rule's test: each candidate verified against the kept image, or a relay."""
        ok = np.array([self.verdict(c, kept).ok for c in cand], bool)
        if self.relay_overlap is None:
            return ok
        relays = self._relays.setdefault(int(kept), [])
        relays += [int(c) for c in cand[ok]][: self.MAX_RELAYS - len(relays)]
        for j in np.flatnonzero(~ok):
            via = next((r for r in relays if self._through(int(cand[j]), r, int(kept))), None)
            if via is not None:
                ok[j] = True
                self._via[(int(cand[j]), int(kept))] = via
        return ok

    def _through(self, c: int, r: int, k: int) -> bool:
        first, hop = self.verdict(c, r), self.verdict(r, k)
        return (first.ok and box_inside_share(first.target_box, hop.source_box) >= self.relay_overlap
                and inlier_support(first.target_box, hop) >= self.relay_overlap)

    def inliers(self, dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
        out = np.zeros(len(dropped), np.int64)
        for i, (d, k) in enumerate(zip(dropped, kept)):
            via = self._via.get((int(d), int(k)))
            verdict = self.verdict(d, k if via is None else via)
            out[i] = verdict.inliers
            details = verdict.details(self.settings.model)
            if via is not None:
                hop = self.verdict(via, k)
                details.update(via_uid=int(self.uids[via]), via_inliers=int(hop.inliers),
                               transform=composed_transform(verdict, hop, self.settings.model))
            self.details[int(self.uids[d])] = details
        return out

    def enrich(self, drops: pa.Table) -> pa.Table:
        return merge_details(drops, self.details)


def composed_transform(first, second, model: str) -> dict:
    """The transform of ``first`` (a -> relay) followed by ``second`` (relay -> kept), for the
    ledger: a's pixels -> the kept image's."""
    m = homogeneous(second.matrix) @ homogeneous(first.matrix)
    composed = Verdict(True, matrix=m if model == "homography" else m[:2], mirrored=first.mirrored != second.mirrored)
    return composed.transform(model)


