"""The torch device a process uses when it is not told which."""

import os

import torch


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch device; without one, this process's GPU when there is one (under a
    launcher, ``LOCAL_RANK`` names it, so that each rank has its own), else the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def switch_on(value: str) -> bool:
    """An ``auto | on | off`` switch of the config (``train.compile``, ``train.channels_last``,
    ``train.fused_adam``): ``auto`` is on where there is CUDA."""
    return value == "on" or (value == "auto" and torch.cuda.is_available())
