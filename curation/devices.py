"""Where model stages run: the GPU a Ray worker was given, else the CPU (one rule for the
safety, embedding and other model stages)."""

from __future__ import annotations


def torch_device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def wants_gpu(cluster_gpus: int) -> bool:
    """Whether a stage should ask Ray for a GPU: the cluster has one, or this process sees one.

    The driver may run on a machine without a GPU while the cluster has some, so the runner's
    GPU count decides first.
    """
    if cluster_gpus > 0:
        return True
    import torch

    return torch.cuda.is_available()
