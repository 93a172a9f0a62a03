"""Yahoo's Open-NSFW model (ResNet-50 variant) through opennsfw2 on Keras 3 with torch.

opennsfw2 is used for its architecture, its weights format and its preprocessing, so scores match
what ``opennsfw2.predict_images`` returns; inference is our own batched torch call so that it
runs on the GPU Ray gave the worker and never tries to download anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from curation.safety.nsfw import NsfwBackend, hdf5_problem, register_backend

WEIGHTS_FILE = "open_nsfw_weights.h5"
# The release asset opennsfw2 itself downloads from (opennsfw2/_download.py).
WEIGHTS_URL = f"https://github.com/bhky/opennsfw2/releases/download/v0.1.0/{WEIGHTS_FILE}"


def import_keras():
    """Keras 3 on the torch backend: the backend is fixed at keras' first import."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(
            f"keras was imported with the {keras.backend.backend()!r} backend; the NSFW stage needs "
            "KERAS_BACKEND=torch set before keras is first imported"
        )
    return keras


@register_backend
class OpenNsfw2Backend(NsfwBackend):
    name = "opennsfw2"
    description = "Yahoo Open-NSFW (opennsfw2 0.19, Keras 3 on torch), YAHOO preprocessing"
    # YAHOO preprocessing squashes to 256x256 (bilinear) first; twice that keeps it a reduction
    # of >= 2x2 decoded pixels per input pixel.
    decode_min_size = (512, 512)

    @classmethod
    def default_weights_path(cls) -> Path:
        # Same rule as opennsfw2._download.get_default_weights_path (importing opennsfw2 would
        # import keras on the driver just to learn a path; a test pins the two together).
        home = os.getenv("OPENNSFW2_HOME", default=str(Path.home()))
        return Path(home) / ".opennsfw2" / "weights" / WEIGHTS_FILE

    @classmethod
    def download_hint(cls) -> str:
        return f"download {WEIGHTS_FILE} from {WEIGHTS_URL}"

    @classmethod
    def weights_problem(cls, path: Path) -> str | None:
        return super().weights_problem(path) or hdf5_problem(path)

    def __init__(self, weights: Path, device: str):
        keras = import_keras()
        import opennsfw2

        self.device = device
        self._keras = keras
        self._preprocessing = opennsfw2.Preprocessing.YAHOO
        self._preprocess = opennsfw2.preprocess_image
        problem = self.weights_problem(Path(weights))
        if problem:
            # Never let opennsfw2 fall back to downloading: that hangs or fails on workers.
            raise FileNotFoundError(problem)
        with keras.device(device):
            self.model = opennsfw2.make_open_nsfw_model(weights_path=str(weights))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self._preprocess(image, self._preprocessing)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        # fp32 on purpose: scores are compared with a threshold, and bf16 moves a softmax
        # probability by up to ~1e-2, which flips decisions near it.
        with torch.no_grad(), self._keras.device(self.device):
            probs = self.model(x, training=False)
        return probs[:, 1].detach().float().cpu().numpy().astype(np.float32)
