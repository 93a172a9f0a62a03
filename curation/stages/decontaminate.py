"""Evaluation-set decontamination, as published for LVD-142M.

Pool images and evaluation images (role ``exclude``, ingested from ``--exclude`` sets) share
one k-NN graph (k = 64) with edges at cosine similarity above 0.45; every connected component
that contains an evaluation image is removed whole from the pool (``eval_contamination``), so
near-copies of near-copies of a test image go too. Each drop names the evaluation image of its
component most similar to it. Evaluation rows themselves are never emitted (the runner sees to
that); seed rows pass through.
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
from curation.dedup.groups import role_mask, rows_of
from curation.dedup.knn_graph import knn_edges
from curation.dedup.settings import KnnGraphConfig, knn_resources
from curation.stage import GlobalResult, GlobalStage, Resources, empty_drops, make_drops
from retrieval.index import KnnIndex, SearchParams

# Evaluation images considered when naming the one a dropped image is closest to.
_NEAREST_EVAL_CANDIDATES = 16


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
        is_pool, is_eval = role_mask(table, schema.POOL), role_mask(table, schema.EXCLUDE)
        mask = (is_pool | is_eval) & valid
        rows = rows_of(table, mask)
        evals = is_eval[mask]
        x = normalize_rows(x[mask])
        summary = {
            "pool_rows": int((is_pool & valid).sum()),
            "eval_rows": int(evals.sum()),
            "skipped_no_descriptor": int(((is_pool | is_eval) & ~valid).sum()),
        }
        if not evals.any() or evals.all():
            summary.update({"edges": 0, "contaminated_components": 0, "dropped": 0, "seconds": round(time.perf_counter() - t0, 3)})
            return GlobalResult(empty_drops(), summary=summary)
        graph = knn_edges(x, cfg.k, cfg.threshold, cfg.index.options(self.context.seed))
        labels = connected_components(len(rows), graph.src, graph.dst)
        tainted = np.zeros(labels.max() + 1, bool)
        tainted[labels[evals]] = True
        dropped = np.flatnonzero(tainted[labels] & ~evals)
        eval_idx, sims = self._nearest_eval_in_component(x, labels, evals, dropped)
        details = [
            {
                "eval_uid": int(rows.uid[e]),
                "eval_id": rows.id[e],
                "eval_source_key": rows.source_key[e],
                "similarity": round(float(s), 4),
            }
            for e, s in zip(eval_idx, sims)
        ]
        drops = make_drops(rows.uid[dropped], [cfg.reason] * len(dropped), details)
        summary.update(
            {
                "edges": graph.num_edges,
                "contaminated_components": int(tainted.sum()),
                "dropped": int(len(dropped)),
                "k": cfg.k,
                "threshold": cfg.threshold,
                "index": graph.index,
                "graph_seconds": round(graph.seconds, 3),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        return GlobalResult(drops, summary=summary)

    def _nearest_eval_in_component(self, x, labels, evals, dropped):
        """For each dropped row, the most similar evaluation image of its own component.

        A k-NN search against the evaluation images finds it in almost every case; when none of
        the nearest candidates shares the component (the link was indirect), the component's
        first evaluation image is named, with the true cosine to it.
        """
        eval_rows = np.flatnonzero(evals)
        if len(dropped) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        k = min(_NEAREST_EVAL_CANDIDATES, len(eval_rows))
        index = KnnIndex(dim=x.shape[1], spec="auto", gpu=self.config.index.gpu, params=SearchParams(query_batch=self.config.index.query_batch))
        sims, ids = index.add(x[eval_rows]).search(x[dropped], k)
        cand = np.where(ids >= 0, eval_rows[np.maximum(ids, 0)], -1)
        same = (cand >= 0) & (labels[np.maximum(cand, 0)] == labels[dropped][:, None])
        first_eval_of_label = np.full(labels.max() + 1, -1, np.int64)
        first_eval_of_label[labels[eval_rows[::-1]]] = eval_rows[::-1]  # smallest index wins
        fallback = first_eval_of_label[labels[dropped]]
        hit = same.any(axis=1)
        pos = same.argmax(axis=1)
        chosen = np.where(hit, cand[np.arange(len(dropped)), pos], fallback)
        chosen_sims = np.einsum("nd,nd->n", x[dropped], x[chosen])
        return chosen, chosen_sims


STAGE = DecontaminateStage
