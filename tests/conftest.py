"""Shared fixtures: real-image data location, a local Ray, generated images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("real-image data (../shared/data) not available")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (ray.init costs ~4 s and ~0.8 GB)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def make_jpeg(seed: int, size=(96, 80), quality: int = 90) -> bytes:
    """A small random-but-structured JPEG (distinct per seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(0.5, 3) + yy * rng.uniform(0.5, 3) + rng.uniform(0, 255)) % 256 for _ in range(3)], -1)
    noise = rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"), "RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture
def jpeg_factory():
    return make_jpeg
