"""The training stream's main-process batching: torch.stack (before) vs numpy (pathgan now).

The main process forms each batch from samples of every loader worker. With ``torch.stack``,
each sample's copy is an OpenMP-parallel region; while the workers keep every core busy
decoding, each region waits for threads that are not running (290 ms per batch of 128 on an
H200 node's 16 cores). Both ways run in the same training stream (``make_image_stream``,
uint8, one worker per core, torch's default thread count in the main process, as in training),
alternating; for each, the stream's images/s and the main process's ms of stacking per batch.

One JSON object out::

    .venv/bin/python bench/batch_stacking.py [--shards DIR] [--batch-size 128]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pathgan.shards import stream as stream_module
from pathgan.shards.pack import PackOptions, pack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_data import SLIDE, cut_slide  # noqa: E402
from rates import images_per_second  # noqa: E402


def torch_stack(samples: list[torch.Tensor], pin: bool = False) -> torch.Tensor:
    """The way batches were stacked before (stream_module.Batches up to this benchmark)."""
    out = torch.empty((len(samples), *samples[0].shape), dtype=samples[0].dtype, pin_memory=pin)
    return torch.stack(samples, out=out)


WAYS = {"torch_stack": torch_stack, "numpy": stream_module.stack_samples}


@dataclass
class Timed:
    """A way of stacking that keeps the seconds it spent."""

    stack: Callable
    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def __call__(self, samples: list[torch.Tensor], pin: bool = False) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.stack(samples, pin)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def stream_rate(shards: Path, stack, batch_size: int, workers: int,
                batches: int) -> tuple[float, float]:
    """(images/s, ms of stacking per batch) of the training stream after 3 batches of warm-up,
    stacking with ``stack``."""
    timed = Timed(stack)
    stream_module.stack_samples = timed  # what stream_module.Batches calls
    stream = stream_module.make_image_stream(shards, batch_size=batch_size, num_workers=workers,
                                        as_uint8=True, shuffle_buffer=4 * batch_size)
    try:
        rate = images_per_second(stream, batches, warmup=3, windows=1,
                                 after_warmup=timed.reset)
        return rate, timed.seconds / timed.calls * 1000
    finally:
        stream.close()
        stream_module.stack_samples = WAYS["numpy"]


def packed_slide(scratch: Path) -> Path:
    """The bundled slide cut at a stride of 112 px (450 patches) and packed."""
    cut_slide(SLIDE, scratch / "patches", stride=112)
    pack([str(scratch / "patches")], scratch / "shards", PackOptions(workers=2, max_count=64))
    return scratch / "shards"


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="a shard set (default: pack the slide)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=cores, help=f"default {cores}")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="the main process's torch threads (default: torch's, one per "
                             "core); 16 on a small machine acts out a 16-core node's pool")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as scratch:
        shards = args.shards or packed_slide(Path(scratch))
        rates = {name: [] for name in WAYS}
        stacking = {name: [] for name in WAYS}
        for _ in range(args.rounds):  # alternate: the machine's load drifts
            for name, stack in WAYS.items():
                rate, ms = stream_rate(shards, stack, args.batch_size, args.workers,
                                       args.batches)
                rates[name].append(rate)
                stacking[name].append(ms)
    stream = {name: round(statistics.median(values), 1) for name, values in rates.items()}
    stack = {name: round(statistics.median(values), 2) for name, values in stacking.items()}
    print(json.dumps({
        "benchmark": "batch_stacking",
        "batch_size": args.batch_size,
        "workers": args.workers,
        "cpu_count": cores,
        "torch_threads": torch.get_num_threads(),
        "stream_images_per_s": stream,
        "stream_speedup": round(stream["numpy"] / stream["torch_stack"], 2),
        "stack_ms_per_batch": stack,
        "stack_speedup": round(stack["torch_stack"] / stack["numpy"], 1),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
