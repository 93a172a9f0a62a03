"""DINOv2-style self-supervised pretraining on a curated manifest, with export and evaluation.

The trainer closes the loop of the curation pipeline: it pretrains a ViT on ``OUT/manifest.json``
and ``curate export`` turns the teacher into a timm-loadable checkpoint that the pipeline's
embedders can use for the next curation round.
"""
