"""`make demo`'s pipeline, at a small size: every stage runs and leaves its outputs."""

import json
import subprocess
import sys

import pytest
from test_train import QUIET


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "pathgan", "demo", "--size", "small", "--out", str(out),
         "--encoder", "timm:mobilenetv3_small_050:random"],
        capture_output=True, text=True, env=QUIET, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "== Where to look" in result.stdout
    assert "== Did they learn? SWD on the pixels' Laplacian pyramids" in result.stdout
    assert (out / "training-patches.png").is_file()
    for run in ("dcgan", "embgan", "r3gan"):
        run_dir = out / "runs" / run
        assert (run_dir / "generator.safetensors").is_file() and (run_dir / "loss.png").is_file()
        assert list((run_dir / "samples").glob("*.png"))
        assert list((run_dir / "wandb").glob("offline-run-*"))
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["untrained", "dcgan", "embgan", "r3gan"]
    assert all(r["n"] == 16 and r["fd"] is not None and r["swd"] > 0 for r in report["runs"])
    assert report["runs"][0]["step"] is None  # the baseline never trained
    for run in report["runs"]:
        assert f"SWD {run['swd']:8.1f}" in result.stdout
        assert f"spectral peak {run['spectral_peak']:7.1f}" in result.stdout or \
            run["name"] == "untrained"
    assert (out / "eval" / "report.md").is_file()
