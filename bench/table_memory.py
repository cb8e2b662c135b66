"""Memory of reading a parquet patch table: pathgan's batch-wise reader vs a whole-table read.

Writes parquet files of random 512 px JPEG patches (one row group per ``--group-rows`` rows),
at two sizes, and reports pyarrow's peak allocation while :class:`pathgan.shards.tables.PatchTable`
yields every row (decoded and resized to 224), against ``pyarrow.parquet.read_table`` of the same
file (the baseline: what holding a table in memory costs), with rows/s. One JSON object out::

    .venv/bin/python bench/table_memory.py [--group-rows 50] [--groups 4 16]
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pathgan.shards.tables import PatchTable, TableColumns


def write_table(path: Path, groups: int, group_rows: int) -> None:
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, pa.schema([("image", pa.binary()), ("label", pa.int64())])) as out:
        for _ in range(groups):
            images = []
            for _ in range(group_rows):
                buffer = io.BytesIO()
                pixels = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
                images.append(buffer.getvalue())
            out.write_table(pa.table({"image": pa.array(images, pa.binary()),
                                      "label": [0] * group_rows}))


def reader_peak(path: Path, batch_rows: int) -> tuple[int, float, int]:
    """(peak pyarrow bytes, seconds, rows) while the reader yields every row."""
    start, peak, rows = time.perf_counter(), 0, 0
    for _ in PatchTable(str(path), TableColumns(label="label")).rows(batch_rows=batch_rows):
        peak, rows = max(peak, pa.total_allocated_bytes()), rows + 1
    return peak, time.perf_counter() - start, rows


def whole_table_bytes(path: Path) -> int:
    table = pq.read_table(path)
    held = pa.total_allocated_bytes()
    del table
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-rows", type=int, default=50)
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--batch-rows", type=int, default=32)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for groups in args.groups:
            path = Path(folder) / f"patches-{groups}.parquet"
            write_table(path, groups, args.group_rows)
            peak, seconds, rows = reader_peak(path, args.batch_rows)
            baseline = whole_table_bytes(path)
            results.append({"rows": rows, "file_mb": round(path.stat().st_size / 2**20, 1),
                            "reader_peak_mb": round(peak / 2**20, 1),
                            "whole_table_mb": round(baseline / 2**20, 1),
                            "reader_over_whole_table": round(peak / baseline, 3),
                            "reader_rows_per_s": round(rows / seconds, 1)})
    print(json.dumps({"benchmark": "table_memory", "batch_rows": args.batch_rows,
                      "group_rows": args.group_rows, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
