"""The GPU check (bench/gpu_check.sh) runs whole on the CPU, so that a GPU loan finds no typo.

The dry run takes every step of the GPU run at tiny sizes: the wheels, the data, ``pytest -m
gpu`` on the CPU, the benchmarks (the loop with the cache and the stream, the shard formats,
embedding, the Embedding GAN) and the JSON. It also runs the GPU tests, so it fails
while they do (the compiled-checkpoint resume needs issue 11's wrapper-free checkpoints).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_report  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check")
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"],
                            env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=1800)
    assert "=== embgan_throughput: exit" in (out / "gpu_check.log").read_text(), result.stderr
    return {"returncode": result.returncode, **json.loads((out / "gpu_check.json").read_text())}


@pytest.mark.slow
def test_every_step_of_the_dry_run_succeeds(dry_run):
    not_ok = {name: step for name, step in dry_run["steps"].items() if step["status"] != "ok"}
    assert not not_ok, json.dumps(not_ok, indent=1)[:3000]
    assert dry_run["returncode"] == 0
    tests = dry_run["steps"]["pytest"]["tests"]
    assert not tests["failed"] and len(tests["passed"]) >= 5
    assert all("fp16" in skipped["test"] for skipped in tests["skipped"])


@pytest.mark.slow
def test_the_dry_run_json_has_every_figure(dry_run):
    assert dry_run["dry_run"] and dry_run["commit"] and dry_run["torch"]
    assert dry_run["elapsed_s"] > 0
    steps = dry_run["steps"]
    train = steps["train_throughput"]["result"]
    assert train["plain_fp32_images_per_s"] > 0 and train["data_stream_images_per_s"] > 0
    assert all(v["images_per_s"] > 0 for v in train["variants"].values())
    (timm,) = steps["embed_throughput"]["result"]["encoders"]
    assert timm["compute_bound"]["flop_per_image"] > 1e9 and timm["forward_only"]
    assert timm["fraction_of_compute_bound"] > 0
    embgan = steps["embgan_throughput"]["result"]
    assert set(embgan["images_per_s"]) == {"dcgan", "embgan_torch"}
    assert steps["data"]["result"]["patches"] > 0
    stacking = steps["batch_stacking"]["result"]
    assert set(stacking["stream_images_per_s"]) == {"torch_stack", "numpy"}
    assert all(ms > 0 for ms in stacking["stack_ms_per_batch"].values())
    assert train["networks_alone_images_per_s"] > 0
    assert all(0 <= v["data_wait_share"] < 1 for v in train["variants"].values())
    formats = steps["shard_formats"]["result"]["formats"]
    assert set(formats) == {"png", "jpg", "raw"}
    for figures in formats.values():
        assert figures["bytes_per_patch"] > 0 and figures["stream_worker_vs_codec"] > 0
        assert figures["loop"]["images_per_s"] > 0, figures["loop"]
    for target in dry_run["targets"].values():  # figures, but no verdict on a CPU
        assert target["pass"] is None
    for name in ("dcgan_training_speedup", "loop_with_device_cache_vs_networks_alone",
                 "loop_with_device_cache_vs_plain_fp32", "loop_with_stream_vs_networks_alone"):
        assert dry_run["targets"][name]["value"] > 0, name


def test_targets_are_judged_on_a_gpu():
    train = {"fastest_variant": "bf16", "device_memory_mb": 80000,
             "variants": {"fp32": {"speedup": 1.0, "peak_reserved_mb": 30000},
                          "bf16": {"speedup": 3.2, "peak_reserved_mb": 20000}}}
    embed = {"encoders": [{"fraction_of_compute_bound": 0.31, "compute_bound": {}}]}
    judged = gpu_report.targets({"train_throughput": train, "embed_throughput": embed},
                                dry_run=False)
    assert judged["dcgan_training_speedup"]["value"] == 3.2
    assert judged["dcgan_training_speedup"]["pass"] is True
    assert judged["embedding_share_of_compute_bound"]["pass"] is False
    memory = judged["reference_dcgan_memory_share"]
    assert memory["value"] == 0.375 and memory["variant"] == "fp32" and memory["pass"] is True
    missing = gpu_report.targets({"train_throughput": None, "embed_throughput": None}, False)
    assert all(t["value"] is None and t["pass"] is None for t in missing.values())


def test_the_feeding_targets_are_judged_on_a_gpu():
    train = {"networks_alone_images_per_s": 4000.0, "variants": {
        "bf16-channels-last-compile-cache": {"vs_networks_alone": 0.93, "speedup": 3.4,
                                             "data_wait_share": 0.001},
        "bf16-channels-last-compile-stream": {"vs_networks_alone": 0.42, "speedup": 1.5,
                                              "data_wait_share": 0.3}}}
    embed = {"encoders": [{"compute_bound": {}, "fraction_of_compute_bound": 0.3,
                           "pathgan_embed": [{"batch_size": 128, "images_per_s": 3500.0},
                                             {"batch_size": 256, "images_per_s": 3000.0}],
                           "forward_only": [{"batch_size": 128, "images_per_s": 17000.0}]}]}
    judged = gpu_report.targets({"train_throughput": train, "embed_throughput": embed},
                                dry_run=False)
    assert judged["loop_with_device_cache_vs_networks_alone"]["pass"] is True
    assert judged["loop_with_device_cache_vs_plain_fp32"]["pass"] is True
    assert judged["loop_with_stream_vs_networks_alone"]["pass"] is False
    embed_target = judged["embed_vs_before"]
    assert embed_target["value"] == 3.24 and embed_target["pass"] is True
    assert embed_target["forward_only_same_batch"] == 17000.0


def test_a_step_json_is_found_after_other_output(tmp_path):
    (tmp_path / "bench.out").write_text('a notice\n{"images_per_s": 1.5,\n "n": 2}\n')
    assert gpu_report.benchmark_result(tmp_path, "bench") == {"images_per_s": 1.5, "n": 2}
    (tmp_path / "broken.out").write_text('{"cut short": ')
    assert gpu_report.benchmark_result(tmp_path, "broken") is None
    assert gpu_report.benchmark_result(tmp_path, "absent") is None


def test_the_dry_run_hides_from_pathgan_what_the_gpu_machine_lacks():
    """An import of an absent module in this repository's code fails; in other code it works."""
    code = textwrap.dedent("""
        import shutil  # which imports fnmatch itself
        try:
            import fnmatch  # noqa: F401
        except ModuleNotFoundError as error:
            print(error)
    """)
    as_repo_file = (f"exec(compile({code!r}, {str(REPO / 'bench' / 'probe.py')!r}, 'exec'), "
                    f"{{'__file__': {str(REPO / 'bench' / 'probe.py')!r}}})")
    env = {**os.environ, "PATHGAN_ABSENT_MODULES": "fnmatch",
           "PYTHONPATH": str(REPO / "bench" / "absent_modules")}
    result = subprocess.run([sys.executable, "-c", as_repo_file], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "No module named 'fnmatch' (absent on the GPU machine" in result.stdout
