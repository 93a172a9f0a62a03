"""Retrieval: choose the pool images that resemble the seed datasets (DINOv2, Table 15).

For every seed dataset in the run and each of its recipes:

* ``as_is`` retrieves nothing here (the emitter ships those seed images as they are);
* ``sample(k, min_similarity)`` takes the k nearest pool images of every seed image;
* ``cluster(min_seeds, per_cluster, cap)`` clusters the pool once (k-means, C clusters; C and
  per_cluster scaled down for small pools by ``retrieval.cluster.cluster_params``, logged and
  reported) and takes the clusters holding more than ``min_seeds`` of the dataset's images.

Pool images retrieved by nothing are dropped (``not_retrieved``). Retrieved ones are kept once,
however many seeds or datasets asked for them, with provenance:

* ``method``: the methods that retrieved the image, in the order "sample+cluster";
* ``seed_dataset``: comma-joined names of the seed datasets that retrieved it (sorted);
* ``seed_ids``: content ids of the linking seed images, most similar first, at most
  ``max_seed_links`` (for cluster retrieval: the dataset's seeds in the image's cluster);
* ``similarity``: the best cosine similarity to a linking seed;
* ``cluster_id``: the pool cluster for cluster retrieval, null for sample retrieval only.

Without any seed dataset in the run (no ``--seeds``) nothing is retrieved and the pool is kept
whole (method "pool"), so the pipeline still produces a cleaned, unfiltered dataset.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curation import schema
from curation.index_settings import IndexSettings
from curation.stage import GlobalResult, GlobalStage, Resources, StageConfig, empty_drops, make_drops
from retrieval.cluster import PAPER_CLUSTERS, ClusterRetrieval, balanced_limits, cluster_params, cluster_retrieval, fit_hierarchy
from retrieval.hierarchical_kmeans import kmeans_with_resampling, pick_rank
from retrieval.kmeans import assign, kmeans
from retrieval.provenance import Provenance, provenance
from retrieval.sample import sample_retrieval

log = logging.getLogger(__name__)

NOT_RETRIEVED = "not_retrieved"


class HierarchyConfig(BaseModel):
    """Levels above the pool's clustering for balanced sampling (Vo et al. 2024)."""

    model_config = ConfigDict(extra="forbid")

    levels: list[int] = Field(
        default_factory=list,
        description="clusters of each level above the pool clustering, fine to coarse (e.g. [10000, 1000] over clusters=100000); "
        "scaled with C for small pools; empty = one level",
    )
    resampling_steps: int = Field(10, ge=0, description="resampling steps at every upper level (ssl-data-curation: 10)")
    resample_size: int | None = Field(None, ge=1, description="points per cluster kept in a resampling step; None = half the mean cluster size of the level")

    @field_validator("levels")
    @classmethod
    def _non_increasing(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v) or any(b > a for a, b in zip(v, v[1:])):
            raise ValueError(f"levels must be positive cluster counts that do not increase from fine to coarse, got {v}")
        return v


class ClusteringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clusters: int = Field(PAPER_CLUSTERS, ge=2, description="k-means clusters of the pool (paper: 100,000)")
    points_per_cluster: int = Field(100, ge=1, description="small pools: C = min(clusters, max(2, round(N / points_per_cluster)))")
    niter: int = Field(20, ge=1)
    max_points_per_centroid: int = Field(256, ge=1, description="training sample per centroid (faiss default)")
    resampling_steps: int = Field(0, ge=0, description="0 = plain k-means (paper); >0 = Vo et al. 2024 resampling steps")
    resample_size: int = Field(10, ge=1, description="points per cluster kept in each resampling step")
    hierarchy: HierarchyConfig = Field(default_factory=HierarchyConfig, description="upper levels for sampling: balanced cluster recipes")

    @model_validator(mode="after")
    def _levels_above_clusters(self):
        if self.hierarchy.levels and self.hierarchy.levels[0] >= self.clusters:
            raise ValueError(f"hierarchy.levels must have fewer clusters than clusters={self.clusters} (level 1), got {self.hierarchy.levels}")
        return self


class RetrieveConfig(StageConfig):
    kind: Literal["retrieve"] = "retrieve"
    embedding: str = Field("embedding", description="column written by the embed stage")
    index: IndexSettings = Field(default_factory=IndexSettings, description="the k-NN index of sample retrieval (and the GPU switch)")
    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig)
    max_seed_links: int = Field(16, ge=1, description="seed ids recorded per retrieved image")
    num_cpus: float = Field(1, gt=0)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """float32 [n, d] from a (fixed-size) list column without nulls."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
        return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    return np.stack([np.asarray(v, np.float32) for v in arr.to_numpy(zero_copy_only=False)])


class _Links:
    """(pool row, seed row, similarity, method, dataset, cluster) rows gathered over recipes."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, pool, seed, sim, method: str, dataset: str, cluster=None):
        n = len(pool)
        if n:
            cl = np.full(n, -1, np.int64) if cluster is None else np.asarray(cluster, np.int64)
            self.parts.append((np.asarray(pool, np.int64), np.asarray(seed, np.int64), np.asarray(sim, np.float32), np.full(n, method, object), np.full(n, dataset, object), cl))

    def arrays(self):
        if not self.parts:
            return None
        cols = list(zip(*self.parts))
        return tuple(np.concatenate(c) for c in cols)


class RetrieveStage(GlobalStage):
    kind = "retrieve"
    Config = RetrieveConfig
    roles = schema.ROLES

    def input_columns(self):
        return (schema.ID, schema.SEED_DATASET, self.config.embedding)

    def output_schema(self) -> pa.Schema:
        return pa.schema(
            [
                pa.field("method", pa.string()),
                pa.field(schema.SEED_DATASET, pa.string()),
                pa.field("seed_ids", pa.list_(pa.string())),
                pa.field("similarity", pa.float32()),
                pa.field("cluster_id", pa.int64()),
            ]
        )

    def resources(self) -> Resources:
        gpu = self.config.index.gpu != "never" and self.context.cluster_gpus > 0
        return Resources(num_cpus=self.config.num_cpus, num_gpus=1 if gpu else 0)

    def manifest_section(self) -> dict:
        return {"embedding": self.config.embedding, "index": self.config.index.model_dump(), "clustering": self.config.clustering.model_dump()}

    # -- partitioned form (curation.retrieve) ---------------------------------------------
    def partitioned_steps(self) -> list:
        from curation.retrieve.steps import retrieve_steps

        return retrieve_steps(self)

    def partitioned_summary(self, counters: dict, facts: dict) -> dict:
        from curation.retrieve.steps import summary

        return summary(self, counters, facts)

    # -- run ------------------------------------------------------------------------------
    def run(self, table: pa.Table) -> GlobalResult:
        t0 = time.perf_counter()
        cfg = self.config
        role = table.column(schema.ROLE)
        has_emb = pc.is_valid(table.column(cfg.embedding))
        pool_rows = np.flatnonzero(pc.and_(pc.equal(role, schema.POOL), has_emb).to_numpy(zero_copy_only=False))
        no_emb_pool = np.flatnonzero(pc.and_(pc.equal(role, schema.POOL), pc.invert(has_emb)).to_numpy(zero_copy_only=False))
        uids = table.column(schema.UID).to_numpy()
        summary: dict = {"pool_images": int(len(pool_rows) + len(no_emb_pool))}

        if not self.context.seeds:
            summary["skipped"] = "no seed datasets in this run: the pool is kept whole"
            ann = self._annotations(uids[pool_rows], ["pool"] * len(pool_rows), [None] * len(pool_rows), [None] * len(pool_rows), [None] * len(pool_rows), [None] * len(pool_rows))
            return GlobalResult(drops=empty_drops(), annotations=ann, summary=summary)

        pool = embedding_matrix(table.column(cfg.embedding).take(pa.array(pool_rows, pa.int64())))
        seed_ds = table.column(schema.SEED_DATASET).to_numpy(zero_copy_only=False)
        is_seed = pc.and_(pc.equal(role, schema.SEED), has_emb).to_numpy(zero_copy_only=False)
        links = _Links()
        per_dataset: dict[str, dict] = {}
        pool_km = None
        for name in sorted(self.context.seeds):
            recipes = list(self.context.seeds[name].get("recipes") or [])
            seed_rows = np.flatnonzero(is_seed & (seed_ds == name))
            seeds = embedding_matrix(table.column(cfg.embedding).take(pa.array(seed_rows, pa.int64())))
            info: dict = {"seed_images": int(len(seed_rows)), "recipes": []}
            for recipe in recipes:
                method = recipe.get("method")
                if method == "as_is":
                    info["recipes"].append({"method": "as_is", "images": int(len(seed_rows))})
                elif method == "sample":
                    info["recipes"].append(self._sample(recipe, pool, seeds, seed_rows, name, links))
                elif method == "cluster":
                    if pool_km is None:
                        pool_km = self._cluster_pool(pool, summary)
                    info["recipes"].append(self._cluster(recipe, pool, pool_km, seeds, seed_rows, name, links, uids[pool_rows]))
                else:
                    raise ValueError(f"seed dataset {name}: unknown recipe method {method!r}")
            per_dataset[name] = info

        arrays = links.arrays()
        retrieved = np.zeros(len(pool_rows), bool)
        ann = None
        if arrays is not None:
            ann, retrieved_idx, by_dataset = self._provenance(arrays, table, pool_rows)
            retrieved[retrieved_idx] = True
            for name, info in per_dataset.items():
                info["retrieved"] = int(sum(r.get("retrieved", 0) for r in info["recipes"]))
                info["final"] = int(by_dataset.get(name, 0))
        for name, info in per_dataset.items():
            info.setdefault("retrieved", 0)
            info.setdefault("final", 0)
            info["collisions"] = int(sum(r.get("collisions", 0) for r in info["recipes"]))
        drop_rows = np.concatenate([pool_rows[~retrieved], no_emb_pool])
        drops = make_drops(
            uids[np.sort(drop_rows)],
            [NOT_RETRIEVED] * len(drop_rows),
            [None] * len(drop_rows),
        )
        if ann is None:
            ann = self._annotations(np.zeros(0, np.int64), [], [], [], [], [])
        summary.update(
            {
                "seed_datasets": per_dataset,
                "retrieved_unique": int(retrieved.sum()),
                "not_retrieved": int(len(drop_rows)),
                "shared_between_datasets": int(sum(1 for v in ann.column(schema.SEED_DATASET).to_pylist() if v and "," in v)),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        log.info("retrieve: %d of %d pool images retrieved", summary["retrieved_unique"], summary["pool_images"])
        return GlobalResult(drops=drops, annotations=ann, summary=summary)

    # -- methods --------------------------------------------------------------------------
    def _sample(self, recipe: dict, pool, seeds, seed_rows, name: str, links: _Links) -> dict:
        k, min_sim = int(recipe.get("k", 4)), recipe.get("min_similarity")
        r = sample_retrieval(
            pool, seeds, k, min_similarity=min_sim, index=self.config.index.spec, gpu=self.config.index.gpu,
            params=self.config.index.search_params(), seed=self.context.seed,
        )
        links.add(r.pool_idx, seed_rows[r.seed_idx], r.similarity, "sample", name)
        return {"method": "sample", "k": k, "min_similarity": min_sim, "retrieved": r.retrieved, "unique": int(len(r.unique)), "collisions": r.collisions}

    def _cluster_pool(self, pool: np.ndarray, summary: dict):
        """k-means of the whole pool, shared by every cluster recipe of the run."""
        c = self.config.clustering
        params = cluster_params(len(pool), per_cluster=1, clusters=c.clusters, points_per_cluster=c.points_per_cluster)
        t0 = time.perf_counter()
        if c.resampling_steps:
            centroids, labels, scores = kmeans_with_resampling(
                pool, params.clusters, resampling_steps=c.resampling_steps, sample_size=c.resample_size,
                niter=c.niter, seed=self.context.seed, spherical=True, gpu=self.config.index.gpu,
            )
        else:
            km = kmeans(pool, params.clusters, niter=c.niter, seed=self.context.seed, spherical=True, gpu=self.config.index.gpu, max_points_per_centroid=c.max_points_per_centroid)
            centroids, labels, scores = km.centroids, km.labels, km.scores
        levels, parents = fit_hierarchy(centroids, c.hierarchy.levels, clusters_configured=c.clusters, resampling_steps=c.hierarchy.resampling_steps,
                                        resample_size=c.hierarchy.resample_size, niter=c.niter, seed=self.context.seed, gpu=self.config.index.gpu)
        clusters_rule = params.rule.split(";")[0]
        log.info("retrieve: pool k-means with C=%d (%s), levels above: %s", params.clusters, clusters_rule, levels)
        summary["pool_clustering"] = {
            "clusters": params.clusters,
            "rule": clusters_rule,
            "resampling_steps": c.resampling_steps,
            "levels": [int(len(centroids))] + levels,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return centroids, labels, scores, parents

    def _cluster(self, recipe: dict, pool, pool_km, seeds, seed_rows, name: str, links: _Links, pool_uids) -> dict:
        centroids, labels, scores, parents = pool_km
        c = self.config.clustering
        params = cluster_params(len(pool), int(recipe.get("per_cluster", 10_000)), c.clusters, c.points_per_cluster)
        log.info("retrieve: %s cluster recipe: %s", name, params.rule)
        seed_labels = assign(seeds, centroids, True, self.config.index.gpu)[0] if len(seeds) else np.zeros(0, np.int64)
        min_seeds, cap = int(recipe.get("min_seeds", 3)), int(recipe.get("cap", 1_000_000))
        balanced = {}
        if recipe.get("sampling") == "balanced":
            r, balanced = self._balanced(recipe, labels, scores, seed_labels, len(centroids), parents, pool_uids, name,
                                         min_seeds=min_seeds, per_cluster=params.per_cluster, cap=cap)
        else:
            r = cluster_retrieval(labels, scores, seed_labels, len(centroids), min_seeds=min_seeds, per_cluster=params.per_cluster, cap=cap)
        m = self.config.max_seed_links
        for cl in np.unique(r.cluster):
            p = r.pool_idx[r.cluster == cl]
            s = np.flatnonzero(seed_labels == cl)
            sims = pool[p] @ seeds[s].T  # [p, s]
            top = np.argsort(-sims, axis=1, kind="stable")[:, :m]
            pp = np.repeat(p, top.shape[1])
            ss = s[top].reshape(-1)
            links.add(pp, seed_rows[ss], np.take_along_axis(sims, top, 1).reshape(-1), "cluster", name, np.full(len(pp), cl))
        return {
            "method": "cluster",
            "min_seeds": int(recipe.get("min_seeds", 3)),
            "per_cluster": params.per_cluster,
            "cap": int(recipe.get("cap", 1_000_000)),
            "clusters_selected": int(len(r.selected_clusters)),
            "capped": bool(r.capped),
            "rule": params.rule,
            **balanced,
            "retrieved": int(len(r.pool_idx)),
            "unique": int(len(r.pool_idx)),
            "collisions": 0,
        }

    def _balanced(self, recipe: dict, labels, scores, seed_labels, n_clusters: int, parents, pool_uids, name: str, *,
                  min_seeds: int, per_cluster: int, cap: int):
        """Hierarchical balanced sampling of the selected clusters down to ``cap`` images."""
        pick = recipe.get("pick", "random")
        sizes = np.bincount(labels, minlength=n_clusters)
        spc = np.bincount(np.asarray(seed_labels, np.int64), minlength=n_clusters)
        selected, limits, capped, facts = balanced_limits(
            sizes, spc, parents, min_seeds=min_seeds, per_cluster=per_cluster, cap=cap, seed=self.context.seed, dataset=name, pick=pick,
        )
        full = np.zeros(n_clusters, np.int64)
        full[selected] = limits
        rank = pick_rank(labels, pool_uids, scores, pick, self.context.seed)
        idx = np.flatnonzero(rank < full[labels])
        return ClusterRetrieval(idx.astype(np.int64), np.asarray(labels, np.int64)[idx], selected, spc, capped), facts

    # -- provenance -----------------------------------------------------------------------
    def _provenance(self, arrays, table: pa.Table, pool_rows: np.ndarray):
        pool_idx, seed_row, sim, method, dataset, cluster = arrays
        ids = table.column(schema.ID).to_numpy(zero_copy_only=False)
        uids = table.column(schema.UID).to_numpy()
        p = provenance(uids[pool_rows[pool_idx]], uids[seed_row], ids[seed_row], sim, method, dataset, cluster, self.config.max_seed_links)
        return self.annotations(p), np.flatnonzero(np.isin(uids[pool_rows], p.uid)), p.by_dataset

    def annotations(self, p: Provenance) -> pa.Table:
        return self._annotations(p.uid, p.method, p.dataset, p.seed_ids, p.similarity, p.cluster)

    def _annotations(self, uids, method, datasets, seed_ids, sim, cluster) -> pa.Table:
        s = self.output_schema()
        return pa.table(
            {
                schema.UID: pa.array(uids, pa.int64()),
                "method": pa.array(method, s.field("method").type),
                schema.SEED_DATASET: pa.array(datasets, pa.string()),
                "seed_ids": pa.array(seed_ids, s.field("seed_ids").type),
                "similarity": pa.array(sim, pa.float32()),
                "cluster_id": pa.array(cluster, pa.int64()),
            }
        )


STAGE = RetrieveStage
