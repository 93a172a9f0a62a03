"""`curate run --config offline` on real photos with planted copies: are the copies dropped, with
ledger reasons that name their representatives, and what else is dropped?

The pool is a temporary folder (never the repository): ``--photos`` real photos from
../shared/data, of which ``--originals`` get ``--copies`` transformed copies each (the
transformations of benchmarks/dedup_quality.py, in rotation). The run is the real command line
(``curate run --pool FOLDER --config offline``), on local Ray. Then, from the ledger:

* planted groups (an original and its copies) collapsed to one image, every other member
  dropped naming a member of its group as the kept image (``kept_source_key``; the keep rule
  keeps the largest, so a padded or screenshotted copy may be kept in place of its original),
  by stage and transformation; images too small for ``decode`` after a crop and rescale;
* every other drop that names a kept image (true duplicates inside ../shared/data, or false
  drops: listed so that a reader can check them);
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
    ap.add_argument("--keep", type=Path, default=None, help="write the pool and the run here instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="offline_run_") as tmp:
        base = args.keep or Path(tmp)
        pool, run = base / "pool", base / "run"
        pool.mkdir(parents=True)
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

    def kept_of(f: str) -> str | None:
        """The file kept in place of ``f`` (None: kept, or dropped without a representative)."""
        r = by_file[f]
        if r["decision"] != "dropped" or not r["details"]:
            return None
        kept = json.loads(r["details"]).get("kept_source_key")
        return kept.rsplit("/", 1)[-1] if kept else None

    # A planted group (original + copies) is found when all but one of its members are dropped
    # naming a member of the group: which one is kept is the keep rule's choice (a padded or
    # screenshotted copy is larger than its original, so it is the one kept).
    members = defaultdict(list)
    for f, v in truth.items():
        if v["transform"] != "photo":
            members[v["group"]].append(f)
    by_transform, found_by_stage = defaultdict(Counter), Counter()
    groups_collapsed = 0
    for g, files in members.items():
        in_group = {f for f in files if kept_of(f) in files}
        groups_collapsed += len(in_group) == len(files) - 1
        for f in files:
            t = truth[f]["transform"]
            by_transform[t]["images"] += 1
            by_transform[t]["dropped_naming_its_group"] += f in in_group
            by_transform[t]["kept_for_its_group"] += any(kept_of(o) == f for o in files)
            by_transform[t]["dropped_by_decode"] += by_file[f]["stage"] == "decode" and by_file[f]["decision"] == "dropped"
            if f in in_group:
                found_by_stage[by_file[f]["stage"]] += 1
    explained = {x for fs in members.values() for x in fs if kept_of(x) in fs}
    others = []
    for f, v in truth.items():
        r = by_file[f]
        if r["decision"] != "dropped" or f in explained:
            continue
        if v["transform"] == "photo" or kept_of(f) is not None:
            kept = kept_of(f) or ""
            others.append({"file": v.get("source", f), "planted": v["transform"] != "photo", "stage": r["stage"], "reason": r["reason"],
                           "kept": truth.get(kept, {}).get("source", kept)})
    report = {
        "benchmark": "offline_run",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": "curate run --pool POOL --out RUN --config offline",
        "images": len(truth),
        "planted_groups": len(members),
        "planted_copies": sum(len(v) - 1 for v in members.values()),
        "planted_groups_collapsed_to_one_image": groups_collapsed,
        "planted_dropped_naming_their_group": int(sum(found_by_stage.values())),
        "planted_dropped_naming_their_group_by_stage": dict(found_by_stage),
        "by_transform": {t: dict(c) for t, c in sorted(by_transform.items())},
        "other_drops_naming_another_image": len(others),
        "other_drops_by_reason": dict(Counter(o["reason"] for o in others)),
        "other_drops": others,
        "counts": manifest["counts"],
        "warnings": manifest["warnings"],
        "wall_seconds": round(wall, 1),
        "images_per_second": round(len(truth) / wall, 2),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "other_drops"}, indent=1))
    for o in others:
        print(f"  other drop: {o['file']} -> kept {o['kept']} ({o['stage']}: {o['reason']})")
    write_result("offline_run", report, args.out)


if __name__ == "__main__":
    main()
