"""launch/train.sh's multi-node path, for real: two "nodes" on this machine, one CPU process
each, meeting over gloo at 127.0.0.1, end with the same parameters."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_train import SMOKE, initial_generator_weight

from pathgan.runs import RunDir

pytestmark = pytest.mark.slow  # two launchers, two training processes

STEPS = 4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _node_environment(machine_rank: int, port: int) -> dict:
    """What one node's train.sh gets: the rendezvous and its rank, no SLURM, this venv."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "PATHGAN_", "MASTER_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",  # this venv's accelerate
        PYTHON=sys.executable,
        VIRTUAL_ENV=sys.prefix,
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
        PATHGAN_TRAIN_MODULE="rank_params_trainer",
        PATHGAN_NUM_MACHINES="2",
        PATHGAN_MACHINE_RANK=str(machine_rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
    )
    return env


def test_two_nodes_on_localhost_end_with_identical_parameters(tmp_path, slide_shards):
    run_dir = tmp_path / "run"
    port = _free_port()
    command = [str(REPO / "launch" / "train.sh"), str(SMOKE), f"data.shards={slide_shards}",
               f"run.dir={run_dir}", f"train.max_steps={STEPS}", f"ckpt.every={STEPS}",
               "train.batch_size=4", "data.num_workers=0", "log.wandb=false"]
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as sink:  # files, not pipes: a full pipe would stall a node
            nodes.append(subprocess.Popen(command, cwd=REPO, env=_node_environment(rank, port),
                                          stdout=sink, stderr=subprocess.STDOUT))
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    for rank, output in enumerate(outputs):
        assert f"machine {rank}/2, 1 process(es) per node" in output  # train.sh's own line
    ranks = [load_file(run_dir / f"params-rank{rank}.safetensors") for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 10
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert not torch.equal(ranks[0]["generator.main.0.weight"], initial_generator_weight())
    assert [row["step"] for row in RunDir(run_dir).read_metrics()][-1] == STEPS
