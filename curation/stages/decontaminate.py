"""Evaluation-set decontamination, as published for LVD-142M.

Pool images and evaluation images (role ``exclude``, ingested from ``--exclude`` sets) share
one k-NN graph (k = 64) with edges at cosine similarity above 0.45; every connected component
that contains an evaluation image is removed whole from the pool (``eval_contamination``), so
near-copies of near-copies of a test image go too. Each drop names the evaluation image of its
own component most similar to it. Evaluation rows themselves are never emitted (the emitter
sees to that); seed rows are not part of this stage (its roles are pool and exclude).

Both forms build the same graph as ``copy_dedup`` (single task, or IVF-partitioned with
distributed components, so components spanning partitions are found whole) and apply the same
per-component rule (``contaminated_drops``).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curation import schema
from curation.dedup.components import connected_components
from curation.dedup.descriptors import descriptor_matrix, normalize_rows
from curation.dedup.groups import Rows, rows_of
from curation.dedup.ivf_graph import graph_summary, knn_graph_steps
from curation.dedup.knn_graph import graph_recall, knn_edges
from curation.dedup.settings import KnnGraphConfig, knn_resources
from curation.partitioned.keepers import keep_step, members_step
from curation.partitioned.keys import sample_rate, sampled
from curation.stage import GlobalResult, GlobalStage, Resources, empty_drops, make_drops

# Pool rows whose similarity to their component's evaluation images is computed at once.
_BLOCK = 4096


def contaminated_drops(rows: Rows, labels: np.ndarray, evals: np.ndarray, x: np.ndarray, reason: str) -> tuple[pa.Table, dict]:
    """Drops of every pool row whose component holds an evaluation row, each naming the most
    similar evaluation image of its own component (ties: the smallest uid). Components are
    counted when they lose at least one pool row."""
    n = len(rows)
    if n == 0 or not evals.any():
        return empty_drops(), {"contaminated_components": 0, "dropped": 0}
    tainted = np.zeros(labels.max() + 1, bool)
    tainted[labels[evals]] = True
    dropped = np.flatnonzero(tainted[labels] & ~evals)
    chosen = np.empty(len(dropped), np.int64)
    sims = np.empty(len(dropped), np.float32)
    order = np.lexsort((rows.uid, labels))  # rows by component, then uid
    lab_sorted = labels[order]
    for comp in np.unique(labels[dropped]):
        a, b = np.searchsorted(lab_sorted, comp, "left"), np.searchsorted(lab_sorted, comp, "right")
        members = order[a:b]
        ev = members[evals[members]]
        pos = np.flatnonzero(labels[dropped] == comp)
        for s in range(0, len(pos), _BLOCK):
            block = pos[s : s + _BLOCK]
            sim = np.einsum("pd,ed->pe", x[dropped[block]], x[ev])  # per-pair sums: no BLAS order
            best = np.argmax(sim, axis=1)
            chosen[block] = ev[best]
            sims[block] = sim[np.arange(len(block)), best]
    details = [
        {"eval_uid": int(rows.uid[e]), "eval_id": rows.id[e], "eval_source_key": rows.source_key[e], "similarity": round(float(v), 4)}
        for e, v in zip(chosen, sims)
    ]
    drops = make_drops(rows.uid[dropped], [reason] * len(dropped), details)
    return drops, {"contaminated_components": int(len(np.unique(labels[dropped]))), "dropped": int(len(dropped))}


class DecontaminateConfig(KnnGraphConfig):
    kind: Literal["decontaminate"] = "decontaminate"
    descriptor: str = Field("sscd_descriptor", description="copy-detection descriptor column (pool and exclude rows)")
    threshold: float = Field(0.45, ge=-1, le=1, description="cosine similarity above which images are linked")
    reason: str = "eval_contamination"


class DecontaminateStage(GlobalStage):
    kind = "decontaminate"
    Config = DecontaminateConfig
    roles = (schema.POOL, schema.EXCLUDE)

    def input_columns(self):
        return (schema.ID, schema.SOURCE_KEY, self.config.descriptor)

    def resources(self) -> Resources:
        return knn_resources(self.config, self.context)

    def run(self, table: pa.Table) -> GlobalResult:
        cfg, t0 = self.config, time.perf_counter()
        x, valid = descriptor_matrix(table.column(cfg.descriptor), cfg.descriptor)
        is_eval = (table.column(schema.ROLE).to_numpy(zero_copy_only=False) == schema.EXCLUDE)
        rows = rows_of(table, valid)
        evals = is_eval[valid]
        x = normalize_rows(x[valid])
        summary = {
            "pool_rows": int((~evals).sum()),
            "eval_rows": int(evals.sum()),
            "skipped_no_descriptor": int((~valid).sum()),
        }
        if not evals.any() or evals.all():
            summary.update({"edges": 0, "contaminated_components": 0, "dropped": 0, "seconds": round(time.perf_counter() - t0, 3)})
            return GlobalResult(empty_drops(), summary=summary)
        index = cfg.index.make_index(x.shape[1], self.context.seed)
        graph = knn_edges(x, cfg.k, cfg.threshold, index)
        labels = connected_components(len(rows), graph.src, graph.dst)
        drops, counts = contaminated_drops(rows, labels, evals, x, cfg.reason)
        queries = np.flatnonzero(sampled(rows.uid, sample_rate(cfg.index.recall_queries, len(rows)), self.context.seed))
        summary.update(
            {
                "edges": graph.num_edges,
                **counts,
                "k": cfg.k,
                "threshold": cfg.threshold,
                "index": graph.index,
                f"recall_at_{cfg.k}": round(graph_recall(x, index, cfg.k, queries), 4),
                "graph_seconds": round(graph.seconds, 3),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        return GlobalResult(drops, summary=summary)

    # -- partitioned form ------------------------------------------------------------------
    def partitioned_steps(self):
        cfg = self.config

        def keep(members: pa.Table, labels: np.ndarray, ctx) -> pa.Table:
            x, _ = descriptor_matrix(members.column(cfg.descriptor), cfg.descriptor)
            evals = members.column(schema.ROLE).to_numpy(zero_copy_only=False) == schema.EXCLUDE
            drops, counts = contaminated_drops(rows_of(members, np.ones(members.num_rows, bool)), labels, evals, normalize_rows(x), cfg.reason)
            ctx.count("contaminated_components", counts["contaminated_components"])
            ctx.count("dropped", counts["dropped"])
            return drops

        return [
            *knn_graph_steps(cfg.descriptor, cfg.k, cfg.threshold, cfg.index, self.context.seed),
            members_step("members", "components/labels", (cfg.descriptor,), identity=(schema.ID, schema.SOURCE_KEY)),
            keep_step("keep", "members/members", keep),
        ]

    def partitioned_summary(self, counters, facts):
        keep = counters.get("keep", {})
        return {
            **graph_summary(counters, facts, self.config.k, self.config.threshold, self.config.index),
            "contaminated_components": int(keep.get("contaminated_components", 0)),
            "dropped": int(keep.get("dropped", 0)),
        }


STAGE = DecontaminateStage
