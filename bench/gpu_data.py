"""The GPU check's shard set, made without a slide reader: the bundled slide cut into patch files
by Pillow, packed by pathgan's packer (its patch-image path) and embedded by ``pathgan embed``.

The GPU machines have neither tiffslide nor TensorFlow. Pillow reads the bundled slide's level 0,
which is all this 2220 x 2967 px region has. Rerunning on the same folder skips finished work
(the cut is renamed into place whole; packing and embedding resume by themselves). JSON out::

    python bench/gpu_data.py --out /tmp/gpu-data [--stride 112] [--device cuda]
"""

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

from pathgan.cli import main as pathgan_cli
from pathgan.shards.format import IMAGE_SIDE, MANIFEST
from pathgan.shards.pack import PackOptions, pack

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "shards" / "cmu_small_region.svs"
#: the encoder the Embedding GAN trains against in the GPU check (no TensorFlow, no download)
EMBED_ENCODER = "timm:vit_tiny_patch16_224:random"
DEFAULT_STRIDE = 224  # 117 patches; 112 gives 450, 448 gives 35


def cut_slide(slide: Path, out_dir: Path, stride: int) -> int:
    """Every 224 px window of the slide at ``stride`` as a PNG file; returns how many."""
    with Image.open(slide) as image:
        pixels = image.convert("RGB")
    width, height = pixels.size
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    count = 0
    for y in range(0, height - IMAGE_SIDE + 1, stride):
        for x in range(0, width - IMAGE_SIDE + 1, stride):
            patch = pixels.crop((x, y, x + IMAGE_SIDE, y + IMAGE_SIDE))
            patch.save(staging / f"patch-x{x:05d}-y{y:05d}.png", compress_level=1)
            count += 1
    staging.rename(out_dir)  # a folder of patches is there whole or not at all
    return count


def prepare(directory: Path, stride: int = DEFAULT_STRIDE, encoder: str = EMBED_ENCODER,
            device: str | None = None, workers: int = 2) -> Path:
    """``directory/shards``: the cut slide packed (train split only) and embedded by
    ``encoder``; returns that shard folder."""
    directory.mkdir(parents=True, exist_ok=True)
    patches, shards = directory / "patches", directory / "shards"
    if not patches.is_dir():
        cut_slide(SLIDE, patches, stride)
    if not (shards / MANIFEST).is_file():
        pack([str(patches)], shards, PackOptions(workers=workers, max_count=64))
    device_args = ["--device", device] if device else []
    with contextlib.redirect_stdout(sys.stderr):  # its summary: stdout is for the JSON
        code = pathgan_cli(["embed", str(shards), "--encoder", encoder, "--batch-size", "32",
                            "--num-workers", "1", "--no-progress", *device_args])
    if code != 0:
        raise RuntimeError(f"pathgan embed {shards} --encoder {encoder} exited with {code}")
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to fill (resumable)")
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                        help=f"pixels between patches (default {DEFAULT_STRIDE})")
    parser.add_argument("--encoder", default=EMBED_ENCODER)
    parser.add_argument("--device", default=None, help="of the embedding (default: cuda if any)")
    parser.add_argument("--workers", type=int, default=2, help="packing processes")
    args = parser.parse_args()
    shards = prepare(args.out, args.stride, args.encoder, args.device, args.workers)
    manifest = json.loads((shards / MANIFEST).read_text())
    print(json.dumps({"shards": str(shards), "patches": manifest["total_samples"],
                      "shard_files": len(manifest["shards"]), "encoder": args.encoder,
                      "bytes": sum(s["bytes"] for s in manifest["shards"])}))


if __name__ == "__main__":
    main()
