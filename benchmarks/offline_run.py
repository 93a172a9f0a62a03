"""`curate run --config offline` on real photos with planted copies: are the copies dropped, with
ledger reasons that name their representatives, and what else is dropped?

The pool is a temporary folder (never the repository): ``--photos`` real photos from
../shared/data, of which ``--originals`` get ``--copies`` transformed copies each (the
transformations of benchmarks/dedup_quality.py, in rotation). The run is the real command line
(``curate run --pool FOLDER --config offline``), on local Ray. Then, from the ledger:

* planted copies dropped, and how many of those drops name a member of their own group as the
  kept image (``kept_source_key``), by stage and transformation;
* unplanted photos dropped, by stage and reason, with their kept image (true duplicates inside
  ../shared/data, or false drops: listed so that a reader can check them);
* the run's wall time and the manifest's warnings (NSFW NOT applied).

    .venv/bin/python benchmarks/offline_run.py --photos 1500 --originals 100
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_result  # noqa: E402
from dedup_quality import TRANSFORMS, real_photos  # noqa: E402
from curation.imaging import decode_rgb  # noqa: E402


def plant(folder: Path, photos: int, originals: int, copies: int, seed: int) -> dict[str, dict]:
    """Write the pool; returns file name -> {group, transform, source}."""
    rng = random.Random(seed)
    files = real_photos()
    rng.shuffle(files)
    names = list(TRANSFORMS)
    truth, t = {}, 0
    for i, path in enumerate(files[:photos]):
        img = decode_rgb(path.read_bytes())
        name = f"p{i:05d}.jpg"
        img.save(folder / name, "JPEG", quality=92)
        truth[name] = {"group": i, "transform": "original" if i < originals else "photo", "source": str(path.relative_to(path.parents[2]))}
        if i >= originals:
            continue
        for c in range(copies):
            tname = names[t % len(names)]
            t += 1
            cname = f"p{i:05d}_copy{c}.jpg"
            TRANSFORMS[tname](img, rng).convert("RGB").save(folder / cname, "JPEG", quality=90)
            truth[cname] = {"group": i, "transform": tname}
    return truth


def ledger_rows(run: Path) -> list[dict]:
    rows = []
    for p in sorted((run / "ledger").rglob("*.parquet")):
        rows += pq.read_table(p, columns=["source_key", "stage", "decision", "reason", "details"]).to_pylist()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=1500)
    ap.add_argument("--originals", type=int, default=100)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="offline_run_") as tmp:
        pool, run = Path(tmp) / "pool", Path(tmp) / "run"
        pool.mkdir()
        truth = plant(pool, args.photos, args.originals, args.copies, args.seed)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "curation.cli", "run", "--pool", str(pool), "--out", str(run), "--config", "offline"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"curate run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        manifest = json.loads((run / "manifest.json").read_text())
        rows = ledger_rows(run)
    by_file = {r["source_key"].rsplit("/", 1)[-1]: r for r in rows}
    planted = {f: v for f, v in truth.items() if v["transform"] not in ("original", "photo")}
    found, named, by_transform = Counter(), Counter(), defaultdict(Counter)
    for f, v in planted.items():
        r = by_file[f]
        dropped = r["decision"] == "dropped"
        kept = json.loads(r["details"]).get("kept_source_key", "") if dropped and r["details"] else ""
        own = dropped and truth.get(kept.rsplit("/", 1)[-1], {}).get("group") == v["group"]
        by_transform[v["transform"]]["copies"] += 1
        by_transform[v["transform"]]["dropped"] += dropped
        by_transform[v["transform"]]["names_its_group"] += own
        if dropped:
            found[r["stage"]] += 1
            named[r["stage"]] += own
    others = []
    for f, v in truth.items():
        r = by_file[f]
        if v["transform"] in ("original", "photo") and r["decision"] == "dropped":
            kept = json.loads(r["details"]).get("kept_source_key", "") if r["details"] else ""
            kept_name = kept.rsplit("/", 1)[-1]
            others.append({"file": v["source"], "stage": r["stage"], "reason": r["reason"],
                           "kept": truth.get(kept_name, {}).get("source", kept_name),
                           "kept_in_same_planted_group": truth.get(kept_name, {}).get("group") == v["group"]})
    report = {
        "benchmark": "offline_run",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": "curate run --pool POOL --out RUN --config offline",
        "images": len(truth),
        "planted_copies": len(planted),
        "planted_dropped": int(sum(found.values())),
        "planted_dropped_naming_their_group": int(sum(named.values())),
        "planted_dropped_by_stage": dict(found),
        "by_transform": {t: dict(c) for t, c in sorted(by_transform.items())},
        "unplanted_dropped": len(others),
        "unplanted_dropped_by_reason": dict(Counter(o["reason"] for o in others)),
        "unplanted_drops": others,
        "counts": manifest["counts"],
        "warnings": manifest["warnings"],
        "wall_seconds": round(wall, 1),
        "images_per_second": round(len(truth) / wall, 2),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "unplanted_drops"}, indent=1))
    for o in others:
        print(f"  unplanted drop: {o['file']} -> kept {o['kept']} ({o['stage']}: {o['reason']})")
    write_result("offline_run", report, args.out)


if __name__ == "__main__":
    main()
