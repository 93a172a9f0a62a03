"""PCA-hash deduplication (the first deduplication step of LVD-142M).

The paper names it without details; we read it as: fit a PCA on a sample of image descriptors
(a model descriptor, or downscaled pixels when no model is configured), project every pool
image on the top ``bits`` components, keep the sign bits as a hash, and treat equal hashes
(``radius: 0``) or hashes within a small Hamming radius as duplicates. Groups are connected
components; one image per group is kept (largest width*height, ties by smallest uid).

The PCA sample is a Bernoulli sample by uid hash (about ``sample_size`` rows), so both forms fit
it on the same rows: the single-task form directly, the partitioned form by collecting the
sample in a map step and fitting it in one aggregate task; the codes then go through the same
multi-index-hashing steps as ``phash_dedup``.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curation import schema
from curation.dedup.binary import hamming, hamming_pairs, within_radius
from curation.dedup.components import connected_components
from curation.dedup.descriptors import descriptor_matrix, normalize_rows
from curation.dedup.groups import duplicate_drops, with_descriptor
from curation.dedup.hash_band import HashBandRule
from curation.dedup.hash_steps import hash_dedup_steps, hash_summary
from curation.dedup.local_features import column_features
from curation.dedup.pca_hash import PcaProjection, fit_pca, sign_codes
from curation.dedup.settings import HashDedupConfig
from curation.partitioned.files import with_partition
from curation.partitioned.keys import sample_rate, sampled
from curation.partitioned.steps import AggregateStep, Artifact, MapStep, Output
from curation.stage import GlobalResult, GlobalStage, Resources, empty_drops

_SAMPLE_SALT = 0x50CA


class PcaHashConfig(HashDedupConfig):
    kind: Literal["pca_hash"] = "pca_hash"
    descriptor: str = Field("pixels_descriptor", description="descriptor column (fixed-size list of floats) to hash")
    # 64 bits within radius 2 on the 32x32 pixel descriptor: precision 0.998 on real photos with
    # transformed copies and distractors (benchmarks/dedup_quality.py); more bits split copies.
    bits: int = Field(64, ge=64, le=256, description="sign bits kept (a multiple of 8, at most the descriptor size)")
    radius: int = Field(2, ge=0, description="largest Hamming distance counted as a duplicate; 0 = equal hashes only")
    sample_size: int = Field(100_000, ge=2, description="descriptors sampled (by uid hash, about this many) to fit the PCA")
    normalize: bool = Field(True, description="L2-normalise descriptors before the PCA")
    index: Literal["auto", "flat", "multihash"] = "auto"
    reason: str = "pca_hash_duplicate"

    @model_validator(mode="after")
    def _bits_multiple_of_8(self) -> "PcaHashConfig":
        if self.bits % 8:
            raise ValueError(f"bits must be a multiple of 8, got {self.bits}")
        return self


class PcaHashStage(GlobalStage):
    kind = "pca_hash"
    Config = PcaHashConfig
    roles = (schema.POOL,)

    def input_columns(self):
        band = (self.config.band.features,) if self.config.band else ()
        return (schema.ID, schema.SOURCE_KEY, schema.WIDTH, schema.HEIGHT, self.config.descriptor, *band)

    def resources(self) -> Resources:
        return Resources(num_cpus=self.config.num_cpus)

    def _vectors(self, x: np.ndarray) -> np.ndarray:
        return normalize_rows(x) if self.config.normalize else x

    def _sample_mask(self, uids: np.ndarray, n_rows: int) -> np.ndarray:
        return sampled(uids, sample_rate(self.config.sample_size, n_rows), self.context.seed ^ _SAMPLE_SALT)

    def _fit(self, sample: np.ndarray) -> PcaProjection:
        if len(sample) < 2:
            raise ValueError(f"the PCA sample has {len(sample)} descriptors; raise sample_size (now {self.config.sample_size})")
        return fit_pca(sample, self.config.bits, len(sample), self.context.seed)

    def _passes(self, codes: np.ndarray):
        if self.config.grouping != "star":
            return None
        return within_radius(codes, self.config.radius)

    def _band_rule(self, members: pa.Table, uids: np.ndarray, codes: np.ndarray) -> HashBandRule:
        return HashBandRule(self.config.band, self.config.radius, column_features(members.column(self.config.band.features)), uids,
                            lambda d, k: hamming(codes[d], codes[k]), lambda radius: within_radius(codes, radius))

    def run(self, table: pa.Table) -> GlobalResult:
        cfg, t0 = self.config, time.perf_counter()
        rows, x, summary = with_descriptor(table, cfg.descriptor)
        x = self._vectors(x)
        if len(rows) < 2:  # nothing to compare (and no PCA to fit)
            summary.update({"edges": 0, "components": 0, "dropped": 0, "seconds": round(time.perf_counter() - t0, 3)})
            return GlobalResult(empty_drops(), summary=summary)
        projection = self._fit(x[self._sample_mask(rows.uid, table.num_rows)])
        codes = sign_codes(x, projection)
        del x
        score, passes, band, evidence = (lambda d, k: hamming(codes[d], codes[k])), self._passes(codes), {}, None
        if cfg.band is None:
            i, j, _, method = hamming_pairs(codes, cfg.radius, cfg.index)
        else:
            rule = self._band_rule(table.filter(table.column(cfg.descriptor).is_valid()), rows.uid, codes)
            g = rule.single_task(codes, np.arange(len(rows)), cfg.index, star=passes is not None)
            i, j, method, band, score, passes, evidence = g.i, g.j, g.index, g.summary, g.score, g.passes, g.evidence
        labels = connected_components(len(rows), i, j)
        drops, counts = duplicate_drops(rows, labels, cfg.reason, "hamming_distance", score, passes)
        if evidence is not None:
            drops = evidence.enrich(drops)
        summary.update(
            {
                "edges": int(len(i)),
                **band,
                "components": counts["groups"],
                "dropped": counts["dropped"],
                "largest_group": counts["largest_group"],
                "distinct_hashes": int(len(np.unique(codes.view(np.dtype((np.void, codes.shape[1])))))),
                "grouping": cfg.grouping,
                "bits": cfg.bits,
                "radius": cfg.radius,
                "index": method,
                "explained_variance_ratio": round(projection.explained_variance_ratio, 4),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        return GlobalResult(drops, summary=summary)

    # -- partitioned form ------------------------------------------------------------------
    def partitioned_steps(self):
        cfg = self.config

        def sample(table, ctx):
            x, valid = descriptor_matrix(table.column(cfg.descriptor), cfg.descriptor)
            uids = table.column(schema.UID).to_numpy()
            keep = valid & self._sample_mask(uids, ctx.state.n_rows)
            t = pa.table({schema.UID: pa.array(uids[keep], pa.int64()), "x": table.column(cfg.descriptor).filter(pa.array(keep))})
            return {"sample": with_partition(t, 0)}

        def fit(inputs, ctx):
            t = inputs["sample/sample"].read()
            if t is None:
                return Artifact(facts={"rows": 0})
            t = t.sort_by(schema.UID)
            x, _ = descriptor_matrix(t.column("x"), cfg.descriptor)
            if len(x) < 2:
                return Artifact(facts={"rows": len(x)})
            p = self._fit(self._vectors(x))
            arrays = {"mean": p.mean, "components": p.components, "explained_variance": p.explained_variance, "total_variance": np.float64(p.total_variance)}
            return Artifact(arrays, {"rows": len(x), "explained_variance_ratio": round(p.explained_variance_ratio, 4)})

        def _projection(ctx) -> PcaProjection | None:
            a = ctx.artifacts("pca").arrays
            if "components" not in a:
                return None
            return PcaProjection(a["mean"], a["components"], a["explained_variance"], float(a["total_variance"]))

        def codes_of(table, ctx):
            x, valid = descriptor_matrix(table.column(cfg.descriptor), cfg.descriptor)
            ctx.count("rows", int(valid.sum()))
            ctx.count("skipped_no_descriptor", int((~valid).sum()))
            projection = _projection(ctx)
            if projection is None:  # fewer than two descriptors: nothing to compare
                return np.zeros(0, np.int64), np.zeros((0, cfg.bits // 8), np.uint8)
            return table.column(schema.UID).to_numpy()[valid], sign_codes(self._vectors(x[valid]), projection)

        def member_codes(members, ctx):
            x, _ = descriptor_matrix(members.column(cfg.descriptor), cfg.descriptor)
            return sign_codes(self._vectors(x), _projection(ctx))

        def score(members, d, k, ctx):
            codes = member_codes(members, ctx)
            return hamming(codes[d], codes[k])

        def test(members, ctx):
            return self._passes(member_codes(members, ctx))

        def band_rule(members, ctx):
            return self._band_rule(members, members.column(schema.UID).to_numpy(), member_codes(members, ctx))

        return [
            MapStep("sample", sample, [Output("sample", 1)]),
            AggregateStep("pca", ["sample/sample"], fit),
            *hash_dedup_steps(codes_of, cfg.radius, 1, cfg.index, (cfg.descriptor,), cfg.reason, score, test=test, nbits=cfg.bits,
                              multi_index=cfg.buckets, band=cfg.band, band_rule=band_rule),
        ]

    def partitioned_summary(self, counters, facts):
        summary = hash_summary(counters, self.config.bits, self.config.radius, self.config.grouping, self.config.buckets, self.config.band)
        b = counters.get("buckets", {})
        summary.update(
            {
                "rows": int(b.get("rows", 0)),
                "skipped_no_descriptor": int(b.get("skipped_no_descriptor", 0)),
                "bits": self.config.bits,
                "pca_sample": facts.get("pca", {}).get("rows", 0),
                "explained_variance_ratio": facts.get("pca", {}).get("explained_variance_ratio"),
            }
        )
        return summary


STAGE = PcaHashStage
