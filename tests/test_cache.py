"""The decoded-patch cache: rank shares, epochs, replay and resume, embeddings and labels row
for row, fallbacks in one line, corrupt samples, and two gloo ranks."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import REPO
from test_convert import ENCODER_ID, embed_with_fake_encoder
from test_train import QUIET

from pathgan.config import load_config
from pathgan.core.errors import PathganError
from pathgan.core.fileio import sha256_file
from pathgan.core.images import hwc_to_chw
from pathgan.models.augment import flip_rotate
from pathgan.shards.format import decode_sample, encode_image, shard_paths
from pathgan.shards.reading import iter_tar_samples
from pathgan.shards.stream import make_image_stream
from pathgan.train.cache import ShareItem, build_cache, rank_shares
from pathgan.train.classes import Classes
from pathgan.train.objective import EMBEDDINGS, IMAGES, labels_key

SMOKE = REPO / "configs" / "dcgan-smoke.yaml"


class OneRank:
    """What the cache asks of Accelerate, for a single process on the CPU."""

    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    def print(self, *args):
        print(*args)


def fingerprint(image_chw: torch.Tensor) -> str:
    return hashlib.sha1(image_chw.contiguous().numpy().tobytes()).hexdigest()


def keys_by_fingerprint(shards_dir) -> dict[str, str]:
    return {fingerprint(hwc_to_chw(decode_sample({"__key__": key, **members})[1])): key
            for path in shard_paths(shards_dir) for key, members in iter_tar_samples(path)}


def cache_for(shards_dir, *overrides, inputs=(IMAGES,), start_step=0, encoder_id=None,
              classes=None):
    config = load_config(SMOKE, [f"data.shards={shards_dir}", "data.num_workers=1",
                                 *overrides])
    return build_cache(config, set(inputs), OneRank(), encoder_id, start_step, classes)


def epoch_keys(cache, known: dict[str, str]) -> list[list[str]]:
    """The keys of each batch of one epoch."""
    return [[known[fingerprint(image)] for image in batch[IMAGES]] for batch in cache]


def test_rank_shares_are_disjoint_cover_the_split_and_differ_by_one_at_most():
    for counts, world in (([12, 12, 12, 4], 2), ([1000] * 7 + [300], 4), ([5, 3], 4)):
        shares = rank_shares(counts, world)
        items = [item for share in shares for item in share]
        assert len(items) == len(set(items)) == sum(counts)  # disjoint, and they cover
        assert set(items) == {ShareItem(s, i) for s, c in enumerate(counts) for i in range(c)}
        sizes = [len(share) for share in shares]
        assert max(sizes) - min(sizes) <= 1
        touched = [len({item.shard for item in share}) for share in shares]
        assert max(touched) <= -(-len(counts) // world) + 1  # its own shards, and a neighbour's


def test_each_sample_once_per_epoch_in_a_fresh_order(slide_shards, capsys):
    known = keys_by_fingerprint(slide_shards)  # 40 samples
    cache = cache_for(slide_shards, "data.cache=host", "train.batch_size=8")
    assert "data cache: 40 train patches of rank 0" in capsys.readouterr().out
    assert cache.batches_per_epoch == 5
    first, second = epoch_keys(cache, known), epoch_keys(cache, known)
    for epoch in (first, second):
        assert [len(batch) for batch in epoch] == [8] * 5
        seen = [key for batch in epoch for key in batch]
        assert sorted(seen) == sorted(known.values())  # every sample, once
    assert first != second
    batch = next(iter(cache))[IMAGES]
    assert batch.dtype == torch.uint8 and batch.shape == (8, 3, 224, 224)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_the_same_seed_replays_and_a_resume_continues_the_permutation(slide_shards):
    known = keys_by_fingerprint(slide_shards)

    def batches(start_step: int, count: int) -> list[list[str]]:
        cache = cache_for(slide_shards, "data.cache=host", "train.batch_size=8",
                          start_step=start_step)
        keys = []
        while len(keys) < count:
            keys += epoch_keys(cache, known)
        return keys[:count]

    run = batches(0, 8)  # crosses into the second epoch
    assert batches(0, 8) == run
    assert batches(3, 5) == run[3:]  # resumed mid-epoch at step 3
    assert batches(6, 2) == run[6:]  # and in the second epoch
    other = cache_for(slide_shards, "data.cache=host", "train.batch_size=8", "run.seed=1")
    assert epoch_keys(other, known) != run[:5]


def test_embeddings_travel_row_for_row_with_their_images(tmp_path, slide_shards):
    shards = tmp_path / "embedded"
    shutil.copytree(slide_shards, shards)
    embed_with_fake_encoder(shards)  # the rows of shard s, sample i: 4 * i .. 4 * i + 3
    rows = {key: np.arange(4 * i, 4 * i + 4, dtype=np.float32)
            for path in shard_paths(shards)
            for i, (key, _) in enumerate(iter_tar_samples(path))}
    known = keys_by_fingerprint(shards)
    cache = cache_for(shards, "data.cache=host", "train.batch_size=8",
                      inputs=(IMAGES, EMBEDDINGS), encoder_id=ENCODER_ID)
    for batch in cache:
        for image, embedding in zip(batch[IMAGES], batch[EMBEDDINGS], strict=True):
            assert np.array_equal(embedding.numpy(), rows[known[fingerprint(image)]])


def write_shards(folder, images: list[np.ndarray], metadata: list[bytes]) -> None:
    """A one-shard set of these PNG images and metadata members, with its manifest."""
    folder.mkdir()
    with wds.TarWriter(str(folder / "train-000000.tar"), encoder=False) as sink:
        for index, (image, meta) in enumerate(zip(images, metadata, strict=True)):
            data = encode_image(image, "png") if image is not None else b"corrupt bytes"
            sink.write({"__key__": f"k{index}", "png": data, "json": meta})
    labels = {}
    for meta in metadata:
        name = str(json.loads(meta).get("label"))
        labels[name] = labels.get(name, 0) + 1
    entry = {"name": "train-000000.tar", "split": "train", "samples": len(images),
             "sha256": sha256_file(folder / "train-000000.tar")}
    (folder / "manifest.json").write_text(json.dumps(
        {"total_samples": len(images), "shards": [entry], "skipped": [], "labels": labels}))


CLASSES = ("dermis", "epidermis")


def labelled_set(folder, count: int = 12, label_of=lambda i: CLASSES[i % 2]):
    """Patch i is grey level 20 i (i < 13), labelled ``label_of(i)``."""
    images = [np.full((224, 224, 3), 20 * i, dtype=np.uint8) for i in range(count)]
    write_shards(folder, images, [json.dumps({"label": label_of(i)}).encode()
                                  for i in range(count)])
    return folder


def test_labels_travel_row_for_row_with_their_images(tmp_path):
    """Under each view's labels key, as the stream's batches carry them."""
    shards = labelled_set(tmp_path / "labelled")
    cache = cache_for(shards, "data.cache=host", "train.batch_size=4",
                      classes=Classes(CLASSES, (6, 6), "sampled"))
    seen = 0
    for batch in cache:
        assert set(batch) == {IMAGES, labels_key(IMAGES)}
        for image, label in zip(batch[IMAGES], batch[labels_key(IMAGES)], strict=True):
            assert int(label) == int(image[0, 0, 0]) // 20 % 2
            seen += 1
    assert seen == 12


def test_balanced_classes_are_drawn_equally_often_from_the_cache(tmp_path, capsys):
    """10 dermis patches and 2 epidermis ones: balanced epochs draw each class about half the
    time (with replacement), the same draws again from the same seed."""
    shards = labelled_set(tmp_path / "skewed", label_of=lambda i: CLASSES[i >= 10])
    classes = Classes(CLASSES, (10, 2), "balanced")

    def draws():
        cache = cache_for(shards, "data.cache=host", "train.batch_size=4", classes=classes)
        return torch.cat([torch.cat([batch[labels_key(IMAGES)] for batch in cache])
                          for _ in range(40)])

    labels = draws()
    assert len(labels) == 40 * 12
    assert 0.4 < labels.float().mean() < 0.6  # epidermis: 1/6 of the set, half of the draws
    assert torch.equal(labels, draws())


@pytest.mark.parametrize("workers", [0, 2])
def test_labels_travel_with_their_images_through_the_stream(tmp_path, workers):
    """Decoded in the main process, or two workers' batches mixed there: each label stays with
    its image, and a sample whose label is not one of the classes is skipped as corrupt."""
    shards = labelled_set(tmp_path / "labelled", count=13,
                          label_of=lambda i: "fat" if i == 12 else CLASSES[i % 2])
    stream = make_image_stream(shards, batch_size=4, num_workers=workers, as_uint8=True,
                               classes=list(CLASSES), shuffle_buffer=4)
    seen = 0
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for _ in range(6):
            for images, labels in stream:
                for image, label in zip(images, labels, strict=True):
                    level = int(image[0, 0, 0]) // 20
                    assert level != 12 and int(label) == level % 2
                    seen += 1
    stream.close()
    assert seen >= 12 and stream.skipped_samples >= 1


def test_device_on_a_cpu_falls_back_to_host_memory_in_one_line(slide_shards, capsys):
    cache = cache_for(slide_shards, "data.cache=device", "train.batch_size=8")
    assert cache is not None and cache.tensors[IMAGES].device.type == "cpu"
    notes = [line for line in capsys.readouterr().out.splitlines() if "data.cache=device" in line]
    assert notes == ["rank 0: data.cache=device: cpu is not a GPU; caching in host memory "
                     "instead"]


def test_a_cache_that_cannot_fit_streams_instead_in_one_line(slide_shards, capsys):
    assert cache_for(slide_shards, "data.cache=auto", "data.cache_fraction=0.000000001") is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "streaming from the shards instead" in lines[0]


def test_corrupt_samples_are_skipped_and_counted_while_filling(tmp_path):
    images = [np.full((224, 224, 3), index * 25, dtype=np.uint8) if index != 4 else None
              for index in range(9)]
    write_shards(tmp_path / "corrupt", images, [b"{}"] * 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = cache_for(tmp_path / "corrupt", "data.cache=host", "train.batch_size=4")
    assert any("skipping corrupt sample k4" in str(w.message) for w in caught)
    assert cache.skipped_samples == 1 and len(cache.valid) == 8
    assert cache.batches_per_epoch == 2


def test_a_split_smaller_than_one_batch_per_rank_is_one_line(slide_shards):
    with pytest.raises(PathganError) as caught:
        cache_for(slide_shards, "data.cache=host", "train.batch_size=64")
    message = str(caught.value)
    assert "has 40 samples" in message and "one batch of 64" in message
    assert "\n" not in message


def test_flip_rotate_draws_every_symmetry_of_the_square():
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(1, 3, 4, 4)
    symmetries = set()
    for turns in range(4):
        turned = torch.rot90(image, turns, dims=(2, 3))
        symmetries |= {fingerprint(turned[0]), fingerprint(turned.flip(3)[0])}
    drawn = flip_rotate(image.expand(256, 3, 4, 4))
    assert {fingerprint(one) for one in drawn} == symmetries and len(symmetries) == 8


TWO_RANKS_SCRIPT = """
import hashlib
import json
import sys

import torch
from accelerate import Accelerator

from pathgan.config import load_config
from pathgan.train.cache import build_cache
from pathgan.train.objective import IMAGES

accelerator = Accelerator(cpu=True)
config = load_config(sys.argv[1], sys.argv[3:])
cache = build_cache(config, {IMAGES}, accelerator, None, start_step=0)
epoch = [[hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest() for image in b[IMAGES]]
         for b in cache]
held = [hashlib.sha1(hwc.numpy().tobytes()).hexdigest()
        for hwc in cache.tensors[IMAGES][cache.valid].permute(0, 3, 1, 2)]
with open(f"{sys.argv[2]}-{accelerator.process_index}.json", "w") as out:
    json.dump({"epoch": epoch, "held": held, "batches": cache.batches_per_epoch}, out)
"""


@pytest.mark.slow
def test_two_gloo_ranks_hold_disjoint_shares_that_cover_the_split(tmp_path, slide_shards):
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(TWO_RANKS_SCRIPT))
    out = tmp_path / "rank"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), str(SMOKE), str(out),
               f"data.shards={slide_shards}", "data.cache=host", "train.batch_size=8",
               "data.num_workers=1"]
    result = subprocess.run(command, capture_output=True, text=True, env=QUIET, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    every = set(keys_by_fingerprint(slide_shards))
    held = [set(rank["held"]) for rank in ranks]
    assert not held[0] & held[1] and held[0] | held[1] == every  # disjoint, and they cover
    assert ranks[0]["batches"] == ranks[1]["batches"] == 5  # 20 samples each, batches of 4
    for rank, mine in zip(ranks, held, strict=True):
        seen = [image for batch in rank["epoch"] for image in batch]
        assert sorted(seen) == sorted(mine)  # each of its samples once in the epoch
