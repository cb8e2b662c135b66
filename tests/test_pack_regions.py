"""Packing at CAMELYON16 scale: the slide layout, region-batched reading, spools and resume."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tiffslide
from conftest import run_cli
from PIL import Image

import pathgan.shards.pack as pack_module
from pathgan.shards import slides
from pathgan.shards.format import load_manifest, shard_paths
from pathgan.shards.inspect import verify_shards
from pathgan.shards.pack import PackOptions, pack
from pathgan.shards.reading import iter_tar_samples
from pathgan.shards.synthetic_slide import CAMELYON16_MPP, write_camelyon16_layout


@pytest.fixture(scope="module")
def camelyon_slide(tmp_path_factory, slide_path) -> Path:
    """A 6144 x 4096, 4-level CAMELYON16-layout slide of the bundled slide's texture."""
    with tiffslide.TiffSlide(slide_path) as texture_slide:
        texture = np.asarray(texture_slide.read_region((600, 800), 0, (640, 640)).convert("RGB"))
    path = tmp_path_factory.mktemp("camelyon") / "tumor_001.tif"
    return write_camelyon16_layout(path, texture, 0.499, 6144, 4096, levels=4,
                                   tissue_fraction=0.5)


def samples_of(shards_dir: Path) -> dict[str, dict]:
    return {key: json.loads(members["json"])
            for path in shard_paths(shards_dir) for key, members in iter_tar_samples(path)}


def test_camelyon16_layout_slide_packs_at_the_mpp_of_its_resolution_tags(tmp_path,
                                                                          camelyon_slide):
    with tifffile.TiffFile(camelyon_slide) as tiff:
        assert len(tiff.pages) == 4
        assert all(page.is_tiled and page.tilewidth == 512 and page.compression == 7
                   and page.tags["ResolutionUnit"].value == 3 for page in tiff.pages)
    out = tmp_path / "camelyon"
    assert run_cli("shards", "pack", camelyon_slide, "--out", out, "--patch-sizes", "224,512",
                   "--target-mpp", "0.5", "--workers", "2") == 0
    samples = list(samples_of(out).values())
    assert len(samples) > 20
    assert {m["mpp_source"] for m in samples} == {"tiffslide.mpp-x"}  # no MPP but the tags
    assert all(m["mpp"] == pytest.approx(CAMELYON16_MPP) for m in samples)
    assert {m["patch_size"]: m["level"] for m in samples} == {461: 1, 1053: 2}
    assert {m["patch_size"]: round(m["output_mpp"], 2) for m in samples} == {461: 0.5, 1053: 1.14}
    assert verify_shards(out) == []


def per_window_pixels(slide, window: slides.PatchWindow) -> np.ndarray:
    """What a plain loop does: read the window alone, resize it."""
    region = slide.read_region((window.x, window.y), window.level, (window.read_size,) * 2)
    region = region.convert("RGB")
    if region.size != (224, 224):
        region = region.resize((224, 224), Image.Resampling.LANCZOS)
    return np.asarray(region)


@pytest.mark.parametrize("reader", ["tiles", "region"])
@pytest.mark.parametrize("which", ["camelyon16-layout", "bundled-svs"])
def test_region_batched_reading_equals_per_window_reading(camelyon_slide, slide_path,
                                                          monkeypatch, reader, which):
    if reader == "region":  # the path of readers other than tiffslide (openslide)
        monkeypatch.setattr(slides.TiffTiles, "supports", staticmethod(lambda *_: False))
    slide = tiffslide.TiffSlide(camelyon_slide if which == "camelyon16-layout" else slide_path)
    sizes = [461, 1053, 300] if which == "camelyon16-layout" else [224, 300]
    windows, _, _ = slides.patch_windows(slide, sizes, 224, overlap=0.5, min_tissue=0.2)
    windows = windows[::3]  # still overlapping, so windows share tiles
    width, height = slide.dimensions
    windows.append(slides.PatchWindow(width - 200, height - 150, 461, slide.level_count - 1,
                                      int(461 / slide.level_downsamples[-1]) + 2, 0.0))
    by_level: dict[int, list] = {}
    for window in windows:
        by_level.setdefault(window.level, []).append(window)
    assert set(by_level) == ({0, 1, 2, 3} if which == "camelyon16-layout" else {0})
    for level_windows in by_level.values():
        for window, pixels in zip(level_windows, slides.read_windows(slide, level_windows, 224),
                                  strict=True):
            np.testing.assert_array_equal(pixels, per_window_pixels(slide, window))


def test_a_corrupt_tile_loses_only_the_patches_on_it(tmp_path, camelyon_slide):
    slide = tiffslide.TiffSlide(camelyon_slide)
    windows, _, _ = slides.patch_windows(slide, [461], 224, 0.0, 0.5)
    victim = windows[len(windows) // 2]
    x, y = slides.level_origin(slide, victim.x, victim.y, 1)
    column, row = x // 512, y // 512
    on_tile = {(w.x, w.y) for w in windows
               if {c // 512 for c in (int(w.x / 2), int(w.x / 2) + w.read_size - 1)} & {column}
               and {r // 512 for r in (int(w.y / 2), int(w.y / 2) + w.read_size - 1)} & {row}}
    broken = tmp_path / "broken.tif"
    shutil.copy(camelyon_slide, broken)
    with tifffile.TiffFile(broken) as tiff:
        page = tiff.pages[1]
        index = row * -(-page.imagewidth // 512) + column
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(broken, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * count)

    out = tmp_path / "out"
    assert run_cli("shards", "pack", broken, "--out", out, "--target-mpp", "0.5",
                   "--max-skipped", "0.5", "--workers", "1") == 0
    manifest = load_manifest(out)
    skipped = {(int(e["key"].split("-x")[1].split("-")[0]), int(e["key"].split("-y")[1]))
               for e in manifest["skipped"]}
    assert skipped == on_tile and len(on_tile) >= 1
    assert all("JPEG" in e["reason"] for e in manifest["skipped"])
    assert manifest["total_samples"] == len(windows) - len(on_tile)
    assert verify_shards(out) == []


def test_a_pack_killed_while_reading_keeps_its_spools_and_ends_byte_identical(
        tmp_path, camelyon_slide, monkeypatch):
    options = dict(patch_sizes=[224, 512], target_mpp=0.5, workers=1, max_count=20)
    fresh = tmp_path / "fresh"
    pack([str(camelyon_slide)], fresh, PackOptions(**options))
    assert not (fresh / ".pack" / "spool").exists()  # spools go once the shards are written

    real_spool_unit, spooled = pack_module.spool_unit, []

    def killed_after_one(job):
        if spooled:
            raise KeyboardInterrupt
        spooled.append(job.unit)
        return real_spool_unit(job)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(pack_module, "spool_unit", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        pack([str(camelyon_slide)], resumed, PackOptions(**options))
    assert len(list((resumed / ".pack" / "spool").glob("*.spool"))) == 1
    assert not shard_paths_on_disk(resumed)

    before_the_kill, spooled = spooled, []

    def counting(job):
        spooled.append(job.unit)
        return real_spool_unit(job)

    monkeypatch.setattr(pack_module, "spool_unit", counting)
    manifest = pack([str(camelyon_slide)], resumed, PackOptions(**options))
    assert spooled and not set(spooled) & set(before_the_kill), "a finished spool was redone"
    assert [s["sha256"] for s in manifest["shards"]] == [
        s["sha256"] for s in load_manifest(fresh)["shards"]]


def shard_paths_on_disk(out: Path) -> list[Path]:
    return sorted(out.glob("*.tar"))
