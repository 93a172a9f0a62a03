"""Safety building blocks used by the ``nsfw`` and ``face_blur`` stages.

* ``nsfw``: the ``NsfwBackend`` interface and its registry (a classifier is chosen by name in the
  pipeline YAML, so another model can be added without touching the stage).
* ``opennsfw2_backend``: Yahoo's Open-NSFW model through opennsfw2 on Keras 3 with the torch
  backend (no TensorFlow).
* ``faces``: MTCNN face detection on a downscaled copy, batched by image size.
* ``blur``: box enlargement, Gaussian or pixelation blurring, re-encoding.
"""
