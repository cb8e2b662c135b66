"""`make demo`'s pipeline, at a small size: every stage runs and leaves its outputs."""

import json
import subprocess
import sys

import pytest
from test_train import QUIET

from pathgan.core.errors import PathganError
from pathgan.demo import Stage, run_side_by_side


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
    # The trainings ran side by side (2 cores here; one lane after the other on 1), their output
    # in a log each; the modern GAN is the conditional run: a grid per class beside the real
    # patches of the class, and the utility table printed.
    assert {log.stem for log in (out / "logs").glob("*.log")} == {
        "show", "show-dermis", "show-epidermis", "embed", "untrained", "dcgan", "embgan", "r3gan",
        "utility"}
    for name in ("dermis", "epidermis"):
        assert list((out / "runs" / "r3gan" / "samples" / name).glob("step_*.png"))
        assert (out / f"training-patches-{name}.png").is_file()
    assert report["runs"][3]["classes"].keys() == {"dermis", "epidermis"}
    assert report["real"]["split"] == "val"  # the held-out region
    utility = json.loads((out / "eval" / "utility.json").read_text())
    assert utility["held_out"].startswith("yes") and len(utility["per_seed"]) == 2
    assert "| real, tested on synthetic (GAN-test) |" in result.stdout


def test_a_failed_stage_stops_its_lane_and_is_raised_once_the_other_lane_is_done(
        tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # two lanes, whatever the machine
    missing = tmp_path / "no-shards"
    lanes = [[Stage("broken", "a stage that fails", ["shards", "show", missing, "--out",
                                                      tmp_path / "grid.png"]),
              Stage("after", "never runs", ["--help"])],
             [Stage("fine", "a stage that works", ["--help"])]]
    with pytest.raises(PathganError, match=r"demo stage 'a stage that fails' failed \(exit 2\)"
                       r"; its output is in .*broken\.log"):
        run_side_by_side(lanes, tmp_path / "logs", every=0.5)
    assert missing.name in (tmp_path / "logs" / "broken.log").read_text()
    assert (tmp_path / "logs" / "fine.log").read_text().startswith("usage: pathgan")
    assert not (tmp_path / "logs" / "after.log").exists()
