"""The GPU check's one JSON: every step's outcome and figures, the machine, and the targets.

``bench/gpu_check.sh`` leaves, in its work folder, ``<step>.status`` (exit code, seconds, time
limit) and ``<step>.out`` (what the step printed: one JSON object for the benchmarks) for every
step, and ``pytest.xml`` (JUnit) for the tests. This reads them all, whatever failed, adds the
device, the software and the commit, and holds the figures against the targets of issue 12::

    python bench/gpu_report.py --work WORK --out OUT/gpu_check.json --commit SHA \
        --started EPOCH_SECONDS [--dry-run]

Exits with 1 when a step did not succeed (the JSON is written all the same).
"""

import argparse
import json
import os
import platform
import sys
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path

import torch

STEPS = ("setup", "data", "batch_stacking", "pytest", "train_throughput", "shard_formats",
         "embed_throughput", "embgan_throughput")
BENCHMARKS = ("data", "batch_stacking", "train_throughput", "shard_formats", "embed_throughput",
              "embgan_throughput")
PACKAGES = ("accelerate", "timm", "webdataset", "numpy", "safetensors", "huggingface_hub")
TIMED_OUT = (124, 137)  # timeout's own code, and SIGKILL after --kill-after
# Issue 12's targets
TRAINING_SPEEDUP = 3.0  # pathgan's DCGAN loop over the plain fp32 eager loop, same GPU
COMPUTE_BOUND_SHARE = 0.40  # embedding forward rate over the device's compute bound
MEMORY_SHARE = 0.5  # "fits with room": the reference DCGAN's peak at most half the GPU
# Issue 20's targets
CACHE_VS_NETWORKS = 0.9  # the loop with the device cache over the networks alone
STREAM_VS_NETWORKS = 0.5  # the loop streaming (16 cores) over the networks alone
EMBED_BEFORE = 1080.5  # pathgan embed's best images/s on the H200 before issue 20 (BENCHMARKS.md)
EMBED_SPEEDUP = 3.0
# the GPU run's variants (compiled), else the dry run's (the same uncompiled)
CACHE_VARIANTS = ("bf16-channels-last-compile-cache", "bf16-channels-last-cache")
STREAM_VARIANTS = ("bf16-channels-last-compile-stream", "bf16-channels-last-stream")
#: what a CPU dry run does not do as the GPU run does (the tests' own skips come from pytest)
CPU_DIFFERENCES = [
    "torch.compile runs with the aot_eager backend in the tests (inductor's C++ build takes "
    "minutes on a small CPU); the compiled training variant is not run",
    "no fp16 training (Accelerate has no CPU fp16, so no GradScaler): skipped tests",
    "no peak GPU memory, and the compute bound is the CPU's",
    "tiny sizes: ngf 8, batches of 2 to 8, a few steps; the targets are not judged",
    "what GPU machines lack (TensorFlow, W&B, tiffslide, ...) is hidden from pathgan's code",
]


def step_outcome(work: Path, name: str) -> dict:
    status_file = work / f"{name}.status"
    if not status_file.is_file():
        return {"status": "not run"}
    status = json.loads(status_file.read_text())
    rc = status["rc"]
    outcome = "ok" if rc == 0 else "timed out" if rc in TIMED_OUT else "failed"
    return {"status": outcome, **status}


def benchmark_result(work: Path, name: str):
    """The JSON object the step printed, or None when it printed none (it failed first).
    Lines printed before it (a library's notice) are passed over."""
    output = work / f"{name}.out"
    lines = output.read_text().splitlines(keepends=True) if output.is_file() else []
    for start, line in enumerate(lines):
        if line.startswith("{"):
            try:
                return json.JSONDecoder().raw_decode("".join(lines[start:]))[0]
            except json.JSONDecodeError:
                continue
    return None


def test_outcomes(junit: Path) -> dict:
    """Passed, failed and skipped tests (with the reason) of a pytest JUnit XML file."""
    if not junit.is_file():
        return {}
    outcomes = {"passed": [], "failed": [], "skipped": []}
    for case in ElementTree.parse(junit).iter("testcase"):
        name = case.get("name")
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()
            outcomes["failed"].append({"test": name, "message": message[0][:300] if message
                                       else ""})
        elif skipped is not None:
            outcomes["skipped"].append({"test": name, "reason": skipped.get("message")})
        else:
            outcomes["passed"].append(name)
    return outcomes


def machine() -> dict:
    cuda = torch.cuda.is_available()
    properties = torch.cuda.get_device_properties(0) if cuda else None
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "device": properties.name if cuda else f"cpu ({os.cpu_count()} cores)",
        "device_memory_mb": round(properties.total_memory / 2**20) if cuda else None,
        "compute_capability": f"{properties.major}.{properties.minor}" if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "packages": versions,
    }


def judged(value, target: str, passed: bool | None, dry_run: bool, **details) -> dict:
    if value is None:
        return {"target": target, "value": None, "pass": None, "note": "no figure (see steps)",
                **details}
    if dry_run:
        return {"target": target, "value": value, "pass": None, "note": "CPU dry run: not judged",
                **details}
    return {"target": target, "value": value, "pass": passed, **details}


def targets(results: dict, dry_run: bool) -> dict:
    train, embed = results.get("train_throughput"), results.get("embed_throughput")
    speedup = fastest = memory = memory_variant = share = compiled_share = None
    if train and train.get("fastest_variant"):
        fastest = train["fastest_variant"]
        speedup = train["variants"][fastest]["speedup"]
        peaks = {v: r["peak_reserved_mb"] for v, r in train["variants"].items()
                 if "peak_reserved_mb" in r}
        if peaks and train.get("device_memory_mb"):
            memory_variant = max(peaks, key=peaks.get)
            memory = round(peaks[memory_variant] / train["device_memory_mb"], 3)
    timm_results = [e for e in (embed or {}).get("encoders", []) if "compute_bound" in e]
    if timm_results:
        share = timm_results[0]["fraction_of_compute_bound"]
        compiled_share = timm_results[0].get("compiled_forward_only", {}).get(
            "fraction_of_compute_bound")
    return {
        **feeding_targets(train, embed, dry_run),
        "dcgan_training_speedup": judged(
            speedup, f">= {TRAINING_SPEEDUP}x the plain fp32 eager loop", speedup is not None
            and speedup >= TRAINING_SPEEDUP, dry_run, variant=fastest),
        "embedding_share_of_compute_bound": judged(
            share, f">= {COMPUTE_BOUND_SHARE:.0%} of bf16 matmul FLOP/s / FLOPs per image",
            share is not None and share >= COMPUTE_BOUND_SHARE, dry_run,
            compiled=compiled_share),  # not judged: pathgan embed runs the encoder eagerly
        "reference_dcgan_memory_share": judged(
            memory, f"peak reserved <= {MEMORY_SHARE:.0%} of the GPU's memory at batch 128",
            memory is not None and memory <= MEMORY_SHARE, dry_run, variant=memory_variant),
    }


def feeding_targets(train: dict | None, embed: dict | None, dry_run: bool) -> dict:
    """Issue 20's targets: the loop against its networks alone and the plain fp32 loop, with
    the device cache and with the stream; ``pathgan embed`` against its rate before."""
    variants = (train or {}).get("variants", {})
    alone = (train or {}).get("networks_alone_images_per_s")
    cache_variant = next((v for v in CACHE_VARIANTS if v in variants), CACHE_VARIANTS[0])
    stream_variant = next((v for v in STREAM_VARIANTS if v in variants), STREAM_VARIANTS[0])
    cache, stream = variants.get(cache_variant, {}), variants.get(stream_variant, {})
    cache_ratio, cache_speedup = cache.get("vs_networks_alone"), cache.get("speedup")
    stream_ratio = stream.get("vs_networks_alone")
    timm = [e for e in (embed or {}).get("encoders", []) if "compute_bound" in e]
    embed_best = forward_at_best = None
    if timm:
        runs = timm[0].get("pathgan_embed", [])
        if runs:
            best = max(runs, key=lambda r: r["images_per_s"])
            embed_best = best["images_per_s"]
            forward_at_best = next((f["images_per_s"] for f in timm[0]["forward_only"]
                                    if f["batch_size"] == best["batch_size"]), None)
    embed_speedup = round(embed_best / EMBED_BEFORE, 2) if embed_best else None
    return {
        "loop_with_device_cache_vs_networks_alone": judged(
            cache_ratio, f">= {CACHE_VS_NETWORKS}x the networks alone (bf16, compiled)",
            cache_ratio is not None and cache_ratio >= CACHE_VS_NETWORKS, dry_run,
            variant=cache_variant, networks_alone_images_per_s=alone,
            data_wait_share=cache.get("data_wait_share")),
        "loop_with_device_cache_vs_plain_fp32": judged(
            cache_speedup, f">= {TRAINING_SPEEDUP}x the plain fp32 eager loop",
            cache_speedup is not None and cache_speedup >= TRAINING_SPEEDUP, dry_run,
            variant=cache_variant),
        "loop_with_stream_vs_networks_alone": judged(
            stream_ratio, f">= {STREAM_VS_NETWORKS}x the networks alone on a 16-core machine",
            stream_ratio is not None and stream_ratio >= STREAM_VS_NETWORKS, dry_run,
            variant=stream_variant, cpu_count=os.cpu_count(),
            data_wait_share=stream.get("data_wait_share")),
        "embed_vs_before": judged(
            embed_speedup, f">= {EMBED_SPEEDUP}x pathgan embed's {EMBED_BEFORE} images/s before",
            embed_speedup is not None and embed_speedup >= EMBED_SPEEDUP, dry_run,
            images_per_s=embed_best, forward_only_same_batch=forward_at_best),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="the check's work folder")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--commit", default="unknown", help="the git commit checked")
    parser.add_argument("--started", type=float, default=None,
                        help="when the check started (seconds since the epoch)")
    parser.add_argument("--dry-run", action="store_true", help="a CPU dry run")
    args = parser.parse_args()
    steps = {name: step_outcome(args.work, name) for name in STEPS}
    results = {name: benchmark_result(args.work, name) for name in BENCHMARKS}
    for name, result in results.items():
        steps[name]["result"] = result
    steps["pytest"]["tests"] = test_outcomes(args.work / "pytest.xml")
    report = {
        "check": "gpu_check", "dry_run": args.dry_run, "commit": args.commit, **machine(),
        "elapsed_s": round(time.time() - args.started, 1) if args.started else None,
        "steps": steps,
        "targets": targets(results, args.dry_run),
        **({"cpu_dry_run_differences": CPU_DIFFERENCES} if args.dry_run else {}),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = [name for name, step in steps.items() if step["status"] != "ok"]
    print(f"gpu_report: {args.out}: steps not ok: {', '.join(failed) or 'none'}; targets: "
          + ", ".join(f"{k} {t['value']} ({'pass' if t['pass'] else t.get('note', 'FAIL')})"
                      for k, t in report["targets"].items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
