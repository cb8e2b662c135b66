"""The training stream: batches mixed across loader workers, a shard order replayed from the seed,
and a clear stop instead of an endless loop when nothing can be read."""

import contextlib
import hashlib
import shutil
import signal
import statistics
import warnings

import pytest
import torch
from conftest import run_cli

from pathgan.core.errors import PathganError
from pathgan.core.images import hwc_to_chw
from pathgan.shards.format import decode_sample, shard_paths
from pathgan.shards.reading import iter_tar_samples
from pathgan.shards.stream import ShardOrder, make_image_stream, stack_samples

SHARD_SAMPLES = 30  # and a shuffle buffer of the same size, the ratio of a real shard set


@pytest.fixture(scope="module")
def two_size_shards(tmp_path_factory, slide_path):
    """The bundled slide at 224 and 512 px, half-overlapping windows, in shards of 30."""
    out = tmp_path_factory.mktemp("two_sizes")
    assert run_cli("shards", "pack", slide_path, "--out", out, "--patch-sizes", "224,512",
                   "--overlap", "0.5", "--max-count", str(SHARD_SAMPLES), "--workers", "1") == 0
    return out


def _fingerprint(image_chw: torch.Tensor) -> str:
    return hashlib.sha1(image_chw.numpy().tobytes()).hexdigest()


def _where_each_patch_lies(shards_dir) -> dict[str, tuple[int, int, int]]:
    """Pixels -> (shard index, patch size, row on the slide), read from the shards themselves."""
    places = {}
    for index, path in enumerate(shard_paths(shards_dir)):
        for key, members in iter_tar_samples(path):
            _, image, metadata = decode_sample({"__key__": key, **members})
            places[_fingerprint(hwc_to_chw(image))] = (index, metadata["patch_size"],
                                                       metadata["y"])
    return places


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_batch_mixes_shards_positions_and_patch_sizes(two_size_shards):
    """Shards hold windows in raster order, size by size. A batch formed inside one worker came
    from one or two shards: a strip of the slide at one size."""
    places = _where_each_patch_lies(two_size_shards)
    assert {size for _, size, _ in places.values()} == {224, 512}
    stream = make_image_stream(two_size_shards, batch_size=16, num_workers=4, seed=3,
                               shuffle_buffer=SHARD_SAMPLES, as_uint8=True)
    batches = [batch for _, batch in zip(range(12), stream.loader, strict=False)]
    stream.close()
    assert all(batch.dtype == torch.uint8 and batch.shape == (16, 3, 224, 224)
               for batch in batches)
    shards, sizes, rows = [], [], []
    for batch in batches:
        found = [places[_fingerprint(image)] for image in batch]
        shards.append(len({shard for shard, _, _ in found}))
        sizes.append(len({size for _, size, _ in found}))
        rows.append(len({row for _, _, row in found}))
    assert min(shards) >= 3, shards
    assert statistics.mean(rows) >= 10, rows
    assert sizes.count(2) >= len(batches) * 2 / 3, sizes


def _drawn_shards(urls, seed: int, rank: int, workers: int = 2, count: int = 24) -> list[str]:
    loader = torch.utils.data.DataLoader(ShardOrder(urls, seed, rank), batch_size=None,
                                         num_workers=workers)
    return [item["url"] for _, item in zip(range(count), loader, strict=False)]


def test_shard_order_is_replayed_from_the_seed_per_rank_and_worker():
    urls = [f"shard-{index}.tar" for index in range(10)]
    drawn = _drawn_shards(urls, seed=7, rank=0)
    assert drawn == _drawn_shards(urls, seed=7, rank=0)
    assert drawn != _drawn_shards(urls, seed=8, rank=0)
    assert drawn != _drawn_shards(urls, seed=7, rank=1)
    first_worker, second_worker = drawn[0::2], drawn[1::2]  # the DataLoader takes turns
    assert first_worker != second_worker
    assert sorted(first_worker[:10]) == sorted(urls)  # every shard once per pass


def test_batches_are_stacked_exactly_whatever_the_samples_layout():
    """The stream's batches are stacked by numpy (no torch thread pool; see Batches): the
    samples, views of the workers' batches or not contiguous, come out as torch.stack has
    them."""
    workers_batch = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    transposed = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8).transpose(1, 2)
    samples = [*workers_batch, transposed]
    batch = stack_samples(samples)
    assert batch.dtype == torch.uint8 and batch.is_contiguous()
    assert torch.equal(batch, torch.stack(samples))


def test_the_same_seed_gives_the_same_batches(slide_shards):
    def first_batches(seed: int, rank: int = 0) -> list[torch.Tensor]:
        stream = make_image_stream(slide_shards, batch_size=4, num_workers=2, seed=seed,
                                   rank=rank, shuffle_buffer=10, as_uint8=True)
        batches = [batch for _, batch in zip(range(3), stream, strict=False)]
        stream.close()
        return batches

    replay = first_batches(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(replay, first_batches(seed=1), strict=True))
    assert not all(torch.equal(a, b)
                   for a, b in zip(replay, first_batches(seed=2), strict=True))


@contextlib.contextmanager
def fails_after(seconds: int):
    """Turn a hang (the bug) into a test failure."""

    def timeout(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _copy_with_unreadable_shards(source, target, how_many: int | None = None):
    shutil.copytree(source, target)
    for path in shard_paths(target)[:how_many]:
        path.write_bytes(b"not a tar file " * 100)
    return target


@pytest.mark.parametrize("workers", [0, 2])
def test_a_rank_whose_shards_are_all_unreadable_stops(tmp_path, slide_shards, workers):
    broken = _copy_with_unreadable_shards(slide_shards, tmp_path / "broken")
    stream = make_image_stream(broken, batch_size=4, num_workers=workers,
                               max_consecutive_failures=20)
    with fails_after(120), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PathganError) as caught:
            next(iter(stream))
    message = str(caught.value)
    assert "no readable sample in 20 tries in a row" in message and "\n" not in message
    assert "pathgan shards verify" in message
    assert stream.skipped.count >= 20


def test_some_unreadable_shards_are_skipped_not_fatal(tmp_path, slide_shards):
    half = len(shard_paths(slide_shards)) // 2
    damaged = _copy_with_unreadable_shards(slide_shards, tmp_path / "damaged", half)
    stream = make_image_stream(damaged, batch_size=4, num_workers=2, shuffle_buffer=4,
                               max_consecutive_failures=20)
    with fails_after(120), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the workers warn about every skipped shard
        epochs = [list(stream) for _ in range(3)]
    stream.close()
    assert [len(epoch) for epoch in epochs] == [stream.batches_per_epoch] * 3
    assert stream.skipped.count >= 1  # counted across the worker processes


SPAWN_SCRIPT = """
import multiprocessing
import sys
from pathgan.shards.stream import make_image_stream

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn", force=True)  # macOS's and Python 3.14's default
    stream = make_image_stream(sys.argv[1], batch_size=4, num_workers=2, as_uint8=True)
    print(sum(len(batch) for batch in stream))
    stream.close()
"""


def test_the_stream_runs_where_spawn_is_the_default(tmp_path, slide_shards):
    import subprocess
    import sys

    script = tmp_path / "spawn_stream.py"
    script.write_text(SPAWN_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(slide_shards)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 0
