"""A stand-in for ``pathgan train`` that follows its preemption contract, for testing the SLURM
plumbing on its own (PATHGAN_TRAIN_MODULE=fake_trainer, with tests/slurm on PYTHONPATH).

--config C [--resume latest] run.dir=D train.max_steps=N ckpt.every=K [train.step_seconds=S]
Each step sleeps; every K steps and on SIGUSR1/SIGTERM it writes D/checkpoints/checkpoint-<step>.
On a signal: finish the step, checkpoint, write D/PREEMPTED, print "preempted at step N", exit 0.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    args = sys.argv[1:]
    overrides = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("--"))
    resume = args[args.index("--resume") + 1] if "--resume" in args else None
    run_dir = Path(overrides["run.dir"])
    max_steps = int(overrides.get("train.max_steps", 20))
    every = int(overrides.get("ckpt.every", 5))
    seconds = float(overrides.get("train.step_seconds", 0.5))
    stop = {"flag": False}

    def handler(signum, frame):
        print(f"fake trainer: got signal {signum}", flush=True)
        stop["flag"] = True

    signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGTERM, handler)
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    step = 0
    if resume == "latest":
        found = sorted(ckpts.glob("checkpoint-*"))
        if found:
            step = json.loads((found[-1] / "state.json").read_text())["step"]
            print(f"resumed from {found[-1]} at step {step}", flush=True)

    def save():
        target = ckpts / f"checkpoint-{step:06d}"
        target.mkdir(exist_ok=True)
        (target / "state.json").write_text(json.dumps({"step": step}))

    (run_dir / "pid-log").open("a").write(f"{os.getpid()} start {step}\n")
    while step < max_steps:
        time.sleep(seconds)
        step += 1
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "Loss_D": 1.0, "Loss_G": 1.0}) + "\n")
        if step % every == 0:
            save()
        if stop["flag"] and step < max_steps:
            save()
            (run_dir / "PREEMPTED").write_text(f"{step}\n")
            print(f"preempted at step {step}", flush=True)
            return 0
    save()
    (run_dir / "PREEMPTED").unlink(missing_ok=True)
    (run_dir / "generator.safetensors").write_text("fake\n")
    print(f"finished at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
