"""What every benchmark shares: where the data and results live, which device and commit a
figure belongs to, and how results are written (JSON under benchmarks/results/)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def device_name(device=None) -> str:
    """'NVIDIA_H100_80GB_HBM3' on a GPU, else 'cpu<N>-<arch>'."""
    try:
        import torch

        if (device is None or getattr(device, "type", str(device)) == "cuda") and torch.cuda.is_available():
            return torch.cuda.get_device_name(0).replace(" ", "_")
    except ImportError:
        pass
    return f"cpu{os.cpu_count()}-{platform.machine()}"


def git_commit() -> str:
    """HEAD, with '-dirty' when the tree has uncommitted changes; 'uncommitted' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uncommitted"
    if head.returncode != 0:
        return "uncommitted"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def write_result(name: str, report: dict, out_dir: Path | None = None, quick: bool = False) -> Path:
    """Write ``report`` (with device, date and commit filled in when missing) as
    ``<out_dir>/<name>-<device>[-quick].json`` and return the path."""
    report = {"device": device_name(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(), **report}
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{report['device']}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
