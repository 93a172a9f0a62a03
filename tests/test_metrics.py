"""Per-stage Ray metrics: recorded inside a Ray worker, exported by the node's metrics agent in
Prometheus text (what Prometheus and the dashboard's Metrics view read)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request

from curation.metrics import record_stage_shard


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def stage_samples(text: str, stage: str) -> dict[str, float]:
    """Samples of one stage, keyed by metric name plus the reason tag, summed over workers."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^ray_(curation_\w+)\{(.*)\} (\S+)$", line)
        if not m or f'stage="{stage}"' not in m.group(2):
            continue
        reason = re.search(r'reason="([^"]*)"', m.group(2))
        key = m.group(1) + (f"[{reason.group(1)}]" if reason else "")
        if "_bucket" in key:
            continue
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def test_recording_outside_ray_is_a_no_op_that_says_so():
    code = "from curation.metrics import record_stage_shard as r; print(r('decode', {'in': 3, 'out': 3, 'dropped': {}, 'seconds': 0.1}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_stage_figures_recorded_in_a_worker_reach_the_nodes_prometheus_endpoint(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def finish_shards() -> bool:
        a = record_stage_shard("metrics_probe", {"in": 64, "out": 60, "dropped": {"corrupt": 3, "too_small": 1}, "seconds": 0.7, "bytes": 123456})
        b = record_stage_shard("metrics_probe", {"in": 10, "out": 10, "dropped": {}, "seconds": 42.0})
        empty = record_stage_shard("metrics_probe", {"in": 0, "out": 0, "dropped": {}, "seconds": 0.01})
        return a and b and empty

    assert ray.get(finish_shards.remote()) is True
    port = ray.nodes()[0]["MetricsExportPort"]
    want = {
        "curation_stage_images_in_total": 74,
        "curation_stage_images_out_total": 70,
        "curation_stage_images_dropped_total[corrupt]": 3,
        "curation_stage_images_dropped_total[too_small]": 1,
        "curation_stage_bytes_total": 123456,
        "curation_stage_shards_total": 3,
        "curation_stage_shard_seconds_count": 3,
    }
    deadline, got = time.time() + 40, {}
    while time.time() < deadline:  # workers push to the agent every few seconds
        got = stage_samples(scrape(port), "metrics_probe")
        if all(got.get(k) == v for k, v in want.items()):
            break
        time.sleep(1)
    assert {k: got.get(k) for k in want} == want
    # 0.7 s and 42 s fall in different histogram buckets.
    buckets = [l for l in scrape(port).splitlines() if "curation_stage_shard_seconds_bucket" in l and 'stage="metrics_probe"' in l]
    counts = {re.search(r'le="([^"]+)"', l).group(1): float(l.rsplit(" ", 1)[1]) for l in buckets}
    assert counts["0.5"] == 1 and counts["1.0"] == 2 and counts["30.0"] == 2 and counts["60.0"] == 3
