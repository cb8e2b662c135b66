"""File-system faults and Ctrl-C end in one line, keep what was finished, and the rerun completes.

The faults are real, injected without root: a child whose file-size limit (RLIMIT_FSIZE) is low
gets EFBIG from the kernel, root or not; a read-only folder stops a non-root child, and as root
a child without the capabilities that override file permissions (CAP_DAC_OVERRIDE and its
kin: a child cannot run as another user here, whose Python lives under a private /root, and
read-only mounts need privileges a CI runner may not give); a SIGINT goes to a real training
process group, as a terminal's Ctrl-C does. Each rerun is the command the error line prints.
"""

import ctypes
import errno
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SLIDE, assert_same_weights, cli_command
from safetensors.torch import load_file
from test_train import QUIET, SMOKE, wait_for

from pathgan.core import errors
from pathgan.core.errors import FileSystemFault, continue_command, fault_code, writing
from pathgan.core.fileio import read_json
from pathgan.runs import RunDir
from pathgan.train.checkpoint import clean_unfinished

ERROR_LINE = re.compile(r"pathgan: error: (.*)")


def one_error_line(stderr: str) -> str:
    """The single ``pathgan: error:`` line of a failed command, which printed no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = ERROR_LINE.findall(stderr)
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def continue_argv(line: str) -> list[str]:
    """The command a fault line says continues the work, as an argv for this interpreter."""
    command = shlex.split(line.split("then continue with: ", 1)[1])
    assert command[0] == "pathgan"
    return cli_command(*command[1:])


def limit_file_size(limit: int):
    def apply() -> None:  # in the child, before it runs: files past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# --- the one mechanism -----------------------------------------------------------------------


def test_a_fault_line_names_the_path_the_meaning_the_free_space_what_was_kept_and_the_command(
        tmp_path):
    with pytest.raises(FileSystemFault) as caught, \
            writing(tmp_path, kept=lambda: "3 finished shard(s)"):
        raise OSError(errno.ENOSPC, "No space left on device")
    fault = caught.value
    fault.set_command(["train", "--config", "c.yaml", "--resume", "runs/x/checkpoints/c-1"])
    text = str(fault)
    assert text.startswith(f"{tmp_path}: no space left on the device (")
    assert re.search(r"\(\d+(\.\d)? (bytes|KB|MB|GB|TB) free\)", text)
    assert "; kept: 3 finished shard(s); free some space, then continue with: " \
           "pathgan train --config c.yaml --resume runs/x/checkpoints/c-1" in text
    # a stage that continues with a flag puts it in place of the one given
    assert continue_command(["train", "--resume", "old", "x=1"], ("--resume", "latest")) == \
        "pathgan train x=1 --resume latest"
    assert continue_command(["train", "--resume=old"], ("--resume", "latest")) == \
        "pathgan train --resume latest"


def test_the_innermost_use_names_the_file_and_the_outer_one_adds_what_was_kept(tmp_path):
    discarded = []
    with pytest.raises(FileSystemFault) as caught, \
            writing(tmp_path, kept=lambda: "checkpoint 2", rerun_args=("--resume", "latest")), \
            writing(tmp_path / "staging", discard=lambda: discarded.append(True)):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "f"))
    assert (caught.value.path, caught.value.kept) == (tmp_path / "f", "checkpoint 2")
    assert caught.value.rerun_args == ("--resume", "latest") and discarded == [True]


def test_errors_wrapped_by_torch_and_safetensors_are_recognised(tmp_path, monkeypatch):
    # safetensors (Rust) and Python wrappers carry the errno in their text
    assert fault_code(RuntimeError("I/O error: File too large (os error 27)"), tmp_path) == \
        errno.EFBIG
    assert fault_code(ValueError("[Errno 122] Disk quota exceeded"), tmp_path) == errno.EDQUOT
    assert fault_code(OSError(errno.EIO, "Input/output error"), tmp_path) is None
    # torch.save says only "unexpected pos": a nearly full disk makes it ENOSPC, ...
    torch_failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                 "1258624 vs 1258512")
    monkeypatch.setattr(errors, "_free_bytes", lambda path: 4096)
    assert fault_code(torch_failure, tmp_path) == errno.ENOSPC
    # ... a file-size limit EFBIG, and neither leaves it unknown (the traceback stays)
    monkeypatch.setattr(errors, "_free_bytes", lambda path: 10 << 30)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1 << 20, 1 << 20))
    assert fault_code(torch_failure, tmp_path) == errno.EFBIG
    monkeypatch.setattr(resource, "getrlimit",
                        lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert fault_code(torch_failure, tmp_path) is None
    with pytest.raises(RuntimeError) as caught, writing(tmp_path / "ckpt"):
        raise torch_failure
    assert caught.value.pathgan_writing == tmp_path / "ckpt"


def test_an_unknown_error_keeps_its_traceback_after_a_line_naming_the_file(tmp_path, capsys):
    from pathgan.cli import run_handler

    def handler(args):
        with writing(tmp_path / "out"):
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError):
        run_handler(handler, None, ["x"])
    assert f"pathgan: OSError while writing {tmp_path / 'out'}; not a known file-system fault" \
           in capsys.readouterr().err


def test_an_interrupt_says_what_was_kept_and_how_to_continue(tmp_path, capsys):
    from pathgan.cli import run_handler

    def handler(args):
        with writing(tmp_path, kept=lambda: "2 finished shard(s)"):
            raise KeyboardInterrupt

    assert run_handler(handler, None, ["shards", "pack", "in", "--out", "o"]) == 130
    assert capsys.readouterr().err.strip() == ("pathgan: interrupted; kept: 2 finished "
                                               "shard(s); continue with: pathgan shards pack in "
                                               "--out o")


def test_a_save_stopped_half_way_is_undone_at_the_next_start(tmp_path):
    run = RunDir(tmp_path)
    for name in ("checkpoint-000002", "checkpoint-000004.partial", "checkpoint-000004.old",
                 "checkpoint-000002.old"):
        (run.checkpoints_dir / name).mkdir(parents=True)
        (run.checkpoints_dir / name / "COMPLETE").write_text("{}")
    clean_unfinished(run)
    # the swap of step 4 died between its renames: the old complete folder takes its name back
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == [
        "checkpoint-000002", "checkpoint-000004"]


# --- real faults in real processes ------------------------------------------------------------


def pack_command(out: Path, *extra: str) -> list[str]:
    """The pack of the ``slide_shards`` fixture (workers shape no byte of the output)."""
    return cli_command("shards", "pack", SLIDE, "--out", out, "--max-count", "12", *extra)


def shard_checksums(shards_dir: Path) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in read_json(shards_dir / "manifest.json")["shards"]}


@pytest.mark.slow
def test_pack_over_the_file_size_limit_in_a_worker_keeps_its_shards_and_the_rerun_matches(
        tmp_path, slide_shards):
    out = tmp_path / "limited"
    failed = subprocess.run(pack_command(out, "--workers", "2"), capture_output=True, text=True,
                            env=QUIET, timeout=300, preexec_fn=limit_file_size(150_000))
    assert failed.returncode == 2
    line = one_error_line(failed.stderr)  # a worker's error, not the pool's traceback
    assert f"{out}/" in line and "file too large for the file-size limit (150.0 KB)" in line
    assert "finished shard(s) in" in line and "raise the limit (ulimit -f)" in line
    assert not list(out.rglob(".*.tmp-*")), "a half-written file was left under its own name"
    rerun = subprocess.run(continue_argv(line), capture_output=True, text=True, env=QUIET,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert shard_checksums(out) == shard_checksums(slide_shards)


CAPABILITY_BOUNDING_SET_DROP = 24  # prctl(PR_CAPBSET_DROP, cap)
PERMISSION_OVERRIDES = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER


def drop_permission_overrides() -> None:
    """In a child of root, before it runs: root without the capabilities that override file
    permissions, which then stop it as they stop anyone (its program gets no more than the
    bounding set)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in PERMISSION_OVERRIDES:
        if libc.prctl(CAPABILITY_BOUNDING_SET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def unprivileged(readonly: Path) -> dict:
    """How to start a child that a read-only folder stops: as it is, or as root without the
    capabilities that override permissions (skipped where root cannot drop them)."""
    if os.geteuid() != 0:
        return {}
    probe = subprocess.run([sys.executable, "-c", f"open({str(readonly / 'probe')!r}, 'w')"],
                           preexec_fn=drop_permission_overrides, capture_output=True)
    if probe.returncode == 0:
        pytest.skip("as root, this machine lets a child write into a read-only folder")
    return {"preexec_fn": drop_permission_overrides}


@pytest.mark.slow
def test_pack_into_a_read_only_folder_says_so_and_the_rerun_matches(tmp_path, slide_shards):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    child = unprivileged(readonly)
    failed = subprocess.run(pack_command(readonly / "shards", "--workers", "1"),
                            capture_output=True, text=True, env=QUIET, timeout=300, **child)
    assert failed.returncode == 2
    line = one_error_line(failed.stderr)
    assert line.startswith(f"{readonly / 'shards'}: permission denied; ")
    assert "write to a folder of yours or fix its permissions, then continue with: " in line
    assert not (readonly / "shards").exists()
    readonly.chmod(0o755)  # the folder made writable, the printed command completes
    rerun = subprocess.run(continue_argv(line), capture_output=True, text=True, env=QUIET,
                           timeout=300, **child)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert shard_checksums(readonly / "shards") == shard_checksums(slide_shards)


TRAIN = ["log.wandb=false", "data.num_workers=0", "train.max_steps=4", "ckpt.every=2"]


def train_argv(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    return cli_command("train", "--config", SMOKE, f"data.shards={shards}", f"run.dir={run_dir}",
                       *overrides)


@pytest.mark.slow
def test_a_checkpoint_over_the_file_size_limit_is_removed_and_the_rerun_matches(
        tmp_path, slide_shards):
    # (data.num_workers=0: a DataLoader worker's shared-memory batch is a file too, and one over
    # the limit stops that worker)
    run_dir = tmp_path / "limited"
    failed = subprocess.run(train_argv(slide_shards, run_dir, *TRAIN), capture_output=True,
                            text=True, env=QUIET, timeout=300,
                            preexec_fn=limit_file_size(400_000))
    assert failed.returncode == 2
    line = one_error_line(failed.stderr)  # not torch's or safetensors' traceback
    partial = RunDir(run_dir).checkpoint_dir(2).name + ".partial"
    assert line.startswith(f"{RunDir(run_dir).checkpoints_dir / partial}: file too large")
    assert f"kept: no complete checkpoint yet in {RunDir(run_dir).checkpoints_dir}" in line
    assert line.endswith("--resume latest")
    assert list(RunDir(run_dir).checkpoints_dir.iterdir()) == []  # the failed save is gone
    rerun = subprocess.run(continue_argv(line), capture_output=True, text=True, env=QUIET,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    undisturbed = tmp_path / "undisturbed"
    subprocess.run(train_argv(slide_shards, undisturbed, *TRAIN), check=True,
                   capture_output=True, env=QUIET, timeout=300)
    assert_same_weights(load_file(run_dir / "generator.safetensors"),
                        load_file(undisturbed / "generator.safetensors"))


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_the_resume_matches(tmp_path, slide_shards):
    run_dir = tmp_path / "interrupted"
    common = ["log.wandb=false", "log.every=1", "ckpt.every=1000"]
    process = subprocess.Popen(train_argv(slide_shards, run_dir, *common, "train.max_steps=1000"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=QUIET, start_new_session=True)
    wait_for(lambda: len(RunDir(run_dir).read_metrics()) >= 2, process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole group
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    step = RunDir(run_dir).last_logged_step()
    assert f"interrupted at step {step}; checkpoint saved; rerun with --resume latest" in stdout
    saved = RunDir(run_dir).checkpoint_dir(step)
    assert [p.name for p in RunDir(run_dir).checkpoints_dir.iterdir()] == [saved.name]
    # the saved step is the step an undisturbed run of that many steps ends at
    undisturbed = tmp_path / "undisturbed"
    subprocess.run(train_argv(slide_shards, undisturbed, *common, f"train.max_steps={step}"),
                   check=True, capture_output=True, env=QUIET, timeout=300)
    assert_same_weights(load_file(saved / "model.safetensors"),
                        load_file(RunDir(undisturbed).checkpoint_dir(step) / "model.safetensors"))
    resumed = subprocess.run(train_argv(slide_shards, run_dir, *common,
                                        f"train.max_steps={step + 2}", "--resume", "latest"),
                             capture_output=True, text=True, env=QUIET, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"finished at step {step + 2}" in resumed.stdout
    assert not RunDir(run_dir).preempted


@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_stops_every_rank_at_the_same_step(tmp_path, slide_shards):
    run_dir = tmp_path / "two-ranks"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "pathgan"]
    command = [*launch, *train_argv(slide_shards, run_dir, "log.wandb=false", "log.every=1",
                                    "ckpt.every=1000", "train.max_steps=1000")[3:]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=QUIET, start_new_session=True)
    wait_for(lambda: len(RunDir(run_dir).read_metrics()) >= 2, process)
    # the terminal's Ctrl-C reaches the launcher alone (each rank has a session of its own);
    # the launcher forwards it to every rank
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    step = RunDir(run_dir).last_logged_step()
    assert f"interrupted at step {step}; checkpoint saved; rerun with --resume latest" in stdout
    saved = RunDir(run_dir).checkpoint_dir(step)
    # both ranks wrote their part of the same step's checkpoint, which is complete
    assert {p.name for p in saved.glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    assert [p.name for p in RunDir(run_dir).checkpoints_dir.iterdir()] == [saved.name]
    assert int(read_json(saved / "COMPLETE")["step"]) == step


def mount_tmpfs(folder: Path, megabytes: int, remount: bool = False) -> None:
    """A small file system of its own (root with CAP_SYS_ADMIN only: skipped elsewhere)."""
    options = f"{'remount,' if remount else ''}size={megabytes}m"
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()[:200]})")


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_one_before_and_the_resume_goes_on(
        tmp_path, slide_shards):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_tmpfs(disk, 24)  # one checkpoint of the smoke DCGAN (about 15 MB) fits, not two
    try:
        run_dir = disk / "run"
        common = ["log.wandb=false", "ckpt.every=2", "ckpt.keep=2", "log.every=1"]
        failed = subprocess.run(train_argv(slide_shards, run_dir, *common, "train.max_steps=6"),
                                capture_output=True, text=True, env=QUIET, timeout=300)
        assert failed.returncode == 2
        line = one_error_line(failed.stderr)  # torch.save's "unexpected pos" recognised
        run = RunDir(run_dir)
        assert line.startswith(f"{run.checkpoints_dir}/checkpoint-000004.partial")
        assert "no space left on the device (" in line
        assert f"kept: the last complete checkpoint, {run.checkpoint_dir(2)} (step 2)" in line
        assert [p.name for p in run.checkpoints_dir.iterdir()] == ["checkpoint-000002"]
        undisturbed = tmp_path / "undisturbed"
        subprocess.run(train_argv(slide_shards, undisturbed, *common, "train.max_steps=2"),
                       check=True, capture_output=True, env=QUIET, timeout=300)
        assert_same_weights(
            load_file(run.checkpoint_dir(2) / "model.safetensors"),
            load_file(RunDir(undisturbed).checkpoint_dir(2) / "model.safetensors"))
        mount_tmpfs(disk, 64, remount=True)  # space freed: the printed command goes on
        resumed = subprocess.run(continue_argv(line), capture_output=True, text=True,
                                 env=QUIET, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout + resumed.stderr
        assert "finished at step 6" in resumed.stdout
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# Commands whose stage wraps its own writes (and says what it kept), or that write nothing.
STAGE_WRAPPED = {"train", "shards pack", "embed", "shards verify"}


def test_every_command_that_writes_names_its_output_for_a_fault_line():
    import argparse

    from pathgan.cli import build_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, (*prefix, name))
        if prefix and parser.get_default("handler"):
            yield " ".join(prefix), parser

    for name, parser in commands(build_parser()):
        writes = parser.get_default("writes")
        assert name in STAGE_WRAPPED or writes is not None, \
            f"pathgan {name}: set_defaults(writes=<the argument naming its output>)"
        if writes is not None:
            assert writes in {a.dest for a in parser._actions}, name


def test_the_first_ctrl_c_asks_the_loop_to_stop_and_the_second_aborts_at_once():
    from pathgan.train.signals import PreemptionFlag

    before = signal.getsignal(signal.SIGINT)
    flag = PreemptionFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled here, on the main thread
        assert flag.requested and flag.interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGINT) is before
