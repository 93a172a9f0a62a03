"""Planning a long URL list: time, plan files and the driver's peak memory at 1M and 10M lines.

Each size is a generated ``.txt`` list of loopback URLs (``http://127.0.0.1/img/...``; nothing
is fetched) in a temporary folder. It is planned in a fresh Python process through
``curation.planning.load_or_make_plan`` -- what ``curate run`` calls before any stage -- into a
new run directory, with the default ingest settings (shard_size 1000). The child reports its
peak resident set size from ``getrusage(RUSAGE_SELF).ru_maxrss`` (the kernel's high-water mark,
imports included), once after its imports and once after planning; planning only streams, so
the peak should not grow with the list (target: 10M / 1M <= 1.2).

    .venv/bin/python benchmarks/plan_scale.py            # 1M and 10M lines
    .venv/bin/python benchmarks/plan_scale.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_result  # noqa: E402  (benchmarks/ is on sys.path)

CHILD = r"""
import json, resource, sys, time
from curation.config import IngestConfig
from curation.planning import load_or_make_plan, source_specs
from curation.store import RunStore
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
plan = load_or_make_plan(RunStore(sys.argv[2]), source_specs([sys.argv[1]], [], []), IngestConfig())
seconds = time.perf_counter() - t0
t1 = time.perf_counter()
resumed = load_or_make_plan(RunStore(sys.argv[2]), source_specs([sys.argv[1]], [], []), IngestConfig())
resume_seconds = time.perf_counter() - t1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "resume_seconds": resume_seconds, "units": plan.num_units, "items": plan.num_items,
                  "plan_files": len(plan.paths()), "resumed_units": resumed.num_units,
                  "rss_after_imports_mb": before / 1024, "peak_rss_mb": peak / 1024}))
"""


def write_list(path: Path, lines: int) -> None:
    with open(path, "w") as f:
        step = 100_000
        for start in range(0, lines, step):
            f.write("".join(f"http://127.0.0.1/img/{i:09d}.jpg\n" for i in range(start, min(start + step, lines))))


def plan_once(url_list: Path, run_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(url_list), str(run_dir)], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["plan_bytes"] = sum(p.stat().st_size for p in (run_dir / "plan").iterdir())
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="URL-list lengths (first and last are compared)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    results = {}
    try:
        for n in args.sizes:
            url_list = work / f"urls-{n}.txt"
            t0 = time.perf_counter()
            write_list(url_list, n)
            made = time.perf_counter() - t0
            r = plan_once(url_list, work / f"run-{n}")
            r.update(lines=n, list_bytes=url_list.stat().st_size, generate_seconds=round(made, 2))
            results[str(n)] = r
            shutil.rmtree(work / f"run-{n}")
            url_list.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'lines':>12} {'plan s':>8} {'resume s':>9} {'files':>6} {'units':>8} {'after imports MB':>17} {'peak RSS MB':>12}")
    for n, r in results.items():
        print(f"{int(n):>12,} {r['seconds']:>8.1f} {r['resume_seconds']:>9.2f} {r['plan_files']:>6} {r['units']:>8,} "
              f"{r['rss_after_imports_mb']:>17.1f} {r['peak_rss_mb']:>12.1f}")
    first, last = results[str(args.sizes[0])], results[str(args.sizes[-1])]
    ratio = last["peak_rss_mb"] / first["peak_rss_mb"]
    print(f"peak RSS {args.sizes[-1]:,} / {args.sizes[0]:,} lines: {ratio:.3f} (target <= 1.2)")
    report = {
        "benchmark": "plan_scale",
        "entry_point": "curation.planning.load_or_make_plan (what curate run calls), default IngestConfig (shard_size 1000)",
        "rss_measure": "ru_maxrss (getrusage RUSAGE_SELF) of the planning subprocess: its peak resident set, imports included",
        "figures": {
            "sizes": results,
            "peak_rss_ratio_last_over_first": round(ratio, 4),
            "plan_seconds_ratio_last_over_first": round(last["seconds"] / first["seconds"], 3),
        },
        "notes": (
            "Each size planned once in a fresh process on a 2-core machine shared with a long CPU benchmark (niced), "
            "so seconds are an upper bound. resume_seconds: the same call again, which reads the plan's index and "
            "fingerprints the inputs (one stat) without re-reading the list."
        ),
    }
    write_result("plan_scale", report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
