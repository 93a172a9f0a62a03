#!/usr/bin/env bash
# Issue 16's GPU measurements (embed with GPU decoding, the k-NN graph at 1M and 10M, the safety
# stages) in one go; benchmarks/gpu_pipeline.py does the work and says what is measured.
#
#   benchmarks/gpu_pipeline.sh prepare    # here, once: wheels -> .whl/, real photos -> .gpu_data/
#   benchmarks/gpu_pipeline.sh selftest   # here: the same code path on the CPU at tiny sizes
#   benchmarks/gpu_pipeline.sh run        # on the GPU machine, e.g. through the device tool:
#       run(command="bash benchmarks/gpu_pipeline.sh run", carry=[".whl", ".gpu_data"], timeout_s=600)
#     the JSON lands in $OUT (or benchmarks/results/); copy it to benchmarks/results/ and commit it.
#
# The GPU machine has torch, torchvision, timm, pyarrow, Pillow, OpenCV, scipy, h5py and NVML but
# no pydantic (stage configs), faiss (retrieval.index), facenet-pytorch, keras or opennsfw2: those
# travel as wheels (about 26 MiB with faiss-cpu; the photos about 35 MiB; the limit is 64 MiB).
# Extra arguments after the subcommand go to gpu_pipeline.py (e.g. --knn-sizes 1000000).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cmd=${1:-run}
shift || true

# name==version as pinned in the project's own environment; Python 3.12 manylinux wheels.
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
        faiss-cpu==1.15.1 facenet-pytorch==2.6.0 keras==3.15.1 namex==0.1.0 optree==0.20.0
        opennsfw2==0.19.0 gdown==6.5.1 beautifulsoup4==4.15.0 soupsieve==4.1.3)

case "$cmd" in
  prepare)
    mkdir -p .whl
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    PYTHONPATH=$PWD "$PY" benchmarks/gpu_pipeline.py prepare --data .gpu_data "$@"
    du -sh .whl .gpu_data
    ;;
  run)
    if ls .whl/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=$PWD:/tmp/site
    else
      export PYTHONPATH=$PWD
    fi
    export HF_HUB_OFFLINE=1 KERAS_BACKEND=torch PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    out=${OUT:-benchmarks/results}
    "$PY" benchmarks/gpu_pipeline.py all --data .gpu_data --out "$out" "$@" 2>&1 | tee "$out/gpu_pipeline.log"
    ;;
  selftest)
    # What the GPU machine lacks and nothing here carries must not be needed: block those imports.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/block"
    for m in ray duckdb imagehash pywt; do echo "raise ImportError('$m is not on the GPU machine')" > "$tmp/block/$m.py"; done
    PYTHONPATH=$PWD "$PY" benchmarks/gpu_pipeline.py prepare --data "$tmp/data" --imagenet 12 --caltech 20
    PYTHONPATH=$tmp/block:$PWD HF_HUB_OFFLINE=1 KERAS_BACKEND=torch \
      "$PY" benchmarks/gpu_pipeline.py all --data "$tmp/data" --out "$tmp/out" --tiny "$@"
    "$PY" - "$tmp/out" <<'PYEOF'
import json, pathlib, sys
(path,) = pathlib.Path(sys.argv[1]).glob("gpu_pipeline-*.json")
report = json.loads(path.read_text())
errors = {part: report[part]["error"] for part in ("embed", "knn", "safety") if isinstance(report.get(part), dict) and "error" in report[part]}
if errors:
    sys.exit(f"selftest failed: {errors}")
print(f"selftest ok: {path.name}, parts {sorted(report['part_seconds'])} in {report['seconds']} s")
PYEOF
    ;;
  *)
    echo "usage: $0 prepare|run|selftest [gpu_pipeline.py options]" >&2
    exit 2
    ;;
esac
