"""The processes of an evaluation: which rank does which samples, and how their rows meet.

Rank ``r`` of ``W`` takes the contiguous slice ``[r * ceil(n/W), (r + 1) * ceil(n/W))`` of the
sample indices, padded to the same length; the rows are gathered, padding dropped and put back
in index order, so every rank holds the whole set. Statistics are computed on rank 0 and
broadcast. Without ``accelerate launch`` all of this is one process doing everything.
"""

import math
import sys

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather
from tqdm.auto import tqdm


def make_state():
    """The process state (one process, or a rank of ``accelerate launch``). With no GPU the
    processes form a gloo group (``cpu=True``); inside a training job the existing state."""
    return PartialState(cpu=not torch.cuda.is_available())


def rank_slice(total: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``range(total)``; every share but the last has
    ``ceil(total / world)`` items (the last may have fewer, or none)."""
    per = math.ceil(total / world) if total else 0
    start = min(rank * per, total)
    return range(start, min(start + per, total))


def gather_rows(indices: torch.Tensor, rows: torch.Tensor, per_rank: int, state) -> tuple:
    """Pad this rank's ``(index, row)`` pairs to ``per_rank``, gather every rank's, drop the
    padding and sort by index: ``(indices, rows)`` of the whole set, the same on every rank."""
    count = len(indices)
    if state.num_processes > 1:
        device = state.device
        padded_index = torch.full((per_rank,), -1, dtype=torch.long, device=device)
        padded_rows = torch.zeros((per_rank, rows.shape[1]), dtype=torch.float32, device=device)
        padded_index[:count] = indices.to(device)
        padded_rows[:count] = rows.to(device, torch.float32)
        indices, rows = gather(padded_index), gather(padded_rows)
        keep = indices >= 0
        indices, rows = indices[keep], rows[keep]
    order = torch.argsort(indices)
    return indices[order].cpu(), rows[order].cpu()


def broadcast(value, state):
    """``value`` of rank 0, on every rank."""
    if state.num_processes == 1:
        return value
    return broadcast_object_list([value])[0]


def log_main(state, message: str) -> None:
    """A line on stderr from the main process only."""
    if state.is_main_process:
        print(message, file=sys.stderr, flush=True)


def progress_bar(state, total: int, description: str):
    """A progress bar of images, shown by the main process on a terminal only."""
    return tqdm(total=total, desc=description, unit="img", leave=False,
                disable=not state.is_main_process or not sys.stderr.isatty())

