"""Per-stage Ray metrics: what a run did, visible in the Ray dashboard and in Prometheus.

The runner calls ``record_stage_shard`` inside the Ray worker that finished a shard (or a global
stage), so the figures are exported by that node's metrics agent (its ``metrics_export_port``),
which Prometheus scrapes and the dashboard's Metrics view graphs. Names as Prometheus shows
them (Ray adds the ``ray_`` prefix):

* ``curation_stage_images_in_total{stage}``, ``curation_stage_images_out_total{stage}``
* ``curation_stage_images_dropped_total{stage, reason}``
* ``curation_stage_bytes_total{stage}``: image bytes read by the stage, when the runner reports it
* ``curation_stage_shard_seconds{stage}``: histogram of seconds per shard (or per global stage)
* ``curation_stage_shards_total{stage}``

Metrics are observability only: a failure to record is logged once and never fails a run.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("curation.metrics")

PREFIX = "curation_stage_"
# Seconds per shard: from sub-second hashing up to hour-long GPU shards.
SECONDS_BOUNDARIES = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]

_metrics: dict[str, Any] | None = None
_warned = False


def _build() -> dict[str, Any]:
    from ray.util.metrics import Counter, Histogram

    stage = ("stage",)
    return {
        "in": Counter(PREFIX + "images_in_total", "images entering a stage", tag_keys=stage),
        "out": Counter(PREFIX + "images_out_total", "images a stage kept", tag_keys=stage),
        "dropped": Counter(PREFIX + "images_dropped_total", "images a stage dropped, by reason", tag_keys=("stage", "reason")),
        "bytes": Counter(PREFIX + "bytes_total", "image bytes read by a stage", tag_keys=stage),
        "shards": Counter(PREFIX + "shards_total", "shards (or global stage runs) completed", tag_keys=stage),
        "seconds": Histogram(PREFIX + "shard_seconds", "seconds per shard or global stage run", boundaries=SECONDS_BOUNDARIES, tag_keys=stage),
    }


def record_stage_shard(stage_name: str, stats: dict) -> bool:
    """Record one finished shard (or global stage). ``stats`` is the runner's per-shard dict:
    ``{"in": n, "out": n, "dropped": {reason: n}, "seconds": s}`` plus optional ``"bytes"``.
    Returns whether the figures were recorded (False outside a Ray worker or driver)."""
    global _metrics, _warned
    try:
        import ray

        if not ray.is_initialized():
            return False
        if _metrics is None:
            _metrics = _build()
        tags = {"stage": stage_name}
        m = _metrics
        # Ray counters only accept increments > 0; an empty shard still counts as a shard.
        for key in ("in", "out", "bytes"):
            if stats.get(key):
                m[key].inc(int(stats[key]), tags)
        for reason, n in (stats.get("dropped") or {}).items():
            if n:
                m["dropped"].inc(int(n), {"stage": stage_name, "reason": str(reason)})
        m["shards"].inc(1, tags)
        m["seconds"].observe(float(stats.get("seconds", 0.0)), tags)
        return True
    except Exception as e:  # noqa: BLE001 - metrics must never stop a run
        if not _warned:
            log.warning("could not record Ray metrics for stage %s: %s", stage_name, e)
            _warned = True
        return False
