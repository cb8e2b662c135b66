"""The training loop shared by the DCGAN and the Embedding GAN.

Read top to bottom: set-up (Accelerate, networks, optimizers, resume, trackers), then one loop
in which every step is a discriminator update and a generator update on the same fake batch,
with logging, samples, checkpoints and preemption at step boundaries. What differs between the
GANs lives in :class:`~pathgan.training.objective.GANObjective`; where real samples come from
lives in :mod:`pathgan.training.data`.
"""

import contextlib
import secrets
import string
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from pathgan.config import Config, config_to_dict, save_config
from pathgan.errors import PathganError
from pathgan.fileio import write_json
from pathgan.images import uint8_to_signed
from pathgan.models import noise_batch
from pathgan.models.export import export_generator, generator_config
from pathgan.training import checkpoint as ckpt
from pathgan.training.build import build_gan, set_encoder_precision
from pathgan.training.data import build_real_data, resolve_encoder_precision
from pathgan.training.ema import GeneratorEMA
from pathgan.training.logbook import Logbook
from pathgan.training.objective import EMBEDDINGS, IMAGES
from pathgan.training.precision import resolve_mixed_precision
from pathgan.training.signals import PreemptionFlag


@dataclass
class TrainResult:
    step: int
    preempted: bool
    run_dir: Path
    generator: torch.nn.Module  # this rank's networks, unwrapped (for notebooks and tests)
    discriminators: dict[str, torch.nn.Module]


def _switch(value: str) -> bool:
    return value == "on" or (value == "auto" and torch.cuda.is_available())


def make_accelerator(config: Config, run_dir: Path) -> Accelerator:
    # broadcast_buffers=False is what we want (rank-local BatchNorm statistics); its successor
    # forward_sync_buffers=False would still sync at init, so the deprecation does not apply.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    return Accelerator(
        # Without CUDA, `accelerate launch --multi_gpu` processes must still form a (gloo) group
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_mixed_precision(config.train.mixed_precision),
        log_with="wandb" if config.log.wandb else None,
        project_dir=str(run_dir),
        # D runs twice (real, fake) before one backward; broadcasting BatchNorm buffers in the
        # second forward breaks autograd (pytorch#22095). Statistics stay per rank instead.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def make_optimizer(modules, config: Config) -> torch.optim.Optimizer:
    params = [p for module in modules for p in module.parameters()]
    fused = _switch(config.train.fused_adam)
    return torch.optim.Adam(params, lr=config.train.lr,
                            betas=(config.train.beta1, config.train.beta2),
                            fused=fused or None, foreach=None if fused else True)


def _reduce_flags(accelerator: Accelerator, *flags: torch.Tensor | bool) -> list[bool]:
    """Whether any rank raised each flag: one all-reduce and one device-to-host read in all."""
    tensor = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=accelerator.device)
                          for f in flags])
    return [bool(v) for v in accelerator.reduce(tensor, reduction="sum").tolist()]


def _nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """A device tensor (no synchronisation here): is any element NaN or infinite?"""
    return ~torch.isfinite(loss.detach()).all()


class WindowStats:
    """Sums of per-step statistics between two log lines, averaged across ranks when read."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1

    def read(self, accelerator: Accelerator, global_batch: int) -> dict[str, float]:
        names = sorted(self.sums)
        means = torch.stack([self.sums[n] for n in names]) / max(self.steps, 1)
        means = accelerator.reduce(means, reduction="mean")
        elapsed = time.perf_counter() - self.started
        values = dict(zip(names, means.tolist(), strict=True))
        values["step_time"] = elapsed / max(self.steps, 1)
        values["images_per_s"] = global_batch * self.steps / max(elapsed, 1e-9)
        if torch.cuda.is_available():
            values["gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return values


class EmbeddingGap:
    """How far fake embeddings are from real ones over a logging window (all ranks).

    ``emb_mean_dist``: distance between the mean embeddings; ``emb_cov_dist``: Frobenius
    distance between the covariances, relative to the real covariance's norm. Both fall as the
    generator closes the gap.
    """

    MAX_ROWS = 4096  # per rank and side; bounds memory on long windows

    def __init__(self) -> None:
        self.real: list[torch.Tensor] = []
        self.fake: list[torch.Tensor] = []
        self.rows = 0

    def add(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        if self.rows < self.MAX_ROWS:
            self.real.append(real.detach().float())
            self.fake.append(fake.detach().float())
            self.rows += len(real)

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        real = accelerator.gather(torch.cat(self.real))
        fake = accelerator.gather(torch.cat(self.fake))
        real_cov, fake_cov = torch.cov(real.T), torch.cov(fake.T)
        return {
            "emb_mean_dist": float((real.mean(0) - fake.mean(0)).norm()),
            "emb_cov_dist": float((real_cov - fake_cov).norm() / real_cov.norm().clamp_min(1e-12)),
        }


def make_evaluator(config: Config, gan, device: torch.device):
    """The in-loop evaluator when ``eval.every`` is set; reuses the training encoder if it is
    the one asked for (Path Foundation is loaded once)."""
    if not config.eval.every:
        return None
    from pathgan.evaluation.evaluator import InLoopEvaluator, eval_encoder_spec

    spec = eval_encoder_spec(config.eval.encoder, config.model.encoder)
    encoder = gan.encoder if gan.encoder is not None and spec == config.model.encoder else spec
    return InLoopEvaluator(config.data.shards, encoder=encoder, n=config.eval.n, device=device,
                           seed=config.run.seed)


def _init_trackers(accelerator: Accelerator, config: Config, state: ckpt.TrainState,
                   run_dir: Path) -> None:
    if not config.log.wandb:
        return
    if state.wandb_run_id is None:  # W&B ids: 8 lowercase letters and digits
        state.wandb_run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                     for _ in range(8))
    accelerator.init_trackers(
        config.log.project,
        config=config_to_dict(config),
        init_kwargs={"wandb": {
            "name": config.run.name or run_dir.name,
            "entity": config.log.entity,
            "tags": config.log.tags,
            "id": state.wandb_run_id,  # a resumed run continues the same W&B run
            "resume": "allow",
            "dir": str(run_dir),
        }},
    )


def evaluate(evaluator, sample_model, state: ckpt.TrainState, logbook: Logbook,
             config: Config, run_dir: Path) -> None:
    """Score the generator (every rank takes part); log it and keep the best generator."""
    scores = evaluator(sample_model)
    logbook.metrics(state.step, {f"eval/{k}": scores[k] for k in
                                 ("fd", "kid_mean", "kid_std", "precision", "recall", "swd",
                                  "n")})
    fd = scores["fd"]  # None when not finite
    if fd is not None and (state.best_fd is None or fd < state.best_fd):
        state.best_fd = fd
        if logbook.active:
            best = run_dir / ckpt.BEST_DIR
            export_generator(sample_model, generator_config(config.model), best)
            write_json(best / "best.json", {"step": state.step, **scores})


@torch.no_grad()
def generate(generator: torch.nn.Module, noise: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Images from a fixed noise batch, in eval mode (BatchNorm running statistics)."""
    was_training = generator.training
    generator.eval()
    images = torch.cat([generator(chunk).float() for chunk in noise.split(batch_size)])
    generator.train(was_training)
    return images


def train(config: Config, resume: str | None = None) -> TrainResult:
    # First of all: a preemption signal during set-up must not kill the process.
    preemption = PreemptionFlag().install()
    try:
        return _train(config, resume, preemption)
    finally:
        preemption.uninstall()


def _train(config: Config, resume: str | None, preemption: PreemptionFlag) -> TrainResult:
    run_dir = Path(config.run.dir)
    accelerator = make_accelerator(config, run_dir)
    world = accelerator.num_processes
    if config.train.batch_size % world:
        raise PathganError(f"train.batch_size {config.train.batch_size} is not divisible by "
                           f"the {world} processes")
    if config.train.sync_bn and world > 1 and accelerator.device.type != "cuda":
        raise PathganError("train.sync_bn needs CUDA; use per-rank statistics on CPU")
    per_rank_batch = config.train.batch_size // world
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    set_seed(config.run.seed)  # the same initial weights on every rank...

    # --- networks, optimizers, data ---------------------------------------------------------
    gan = build_gan(config, accelerator.device)
    generator, discriminators = gan.generator, gan.discriminators
    if config.train.sync_bn and world > 1:
        generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        discriminators = {k: torch.nn.SyncBatchNorm.convert_sync_batchnorm(d)
                          for k, d in discriminators.items()}
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    generator = generator.to(accelerator.device, memory_format=memory_format)
    discriminators = {k: d.to(accelerator.device, memory_format=memory_format)
                      for k, d in discriminators.items()}
    ema = (GeneratorEMA(generator, config.train.ema_kimg, config.train.ema_rampup)
           if config.train.ema else None)
    g_optimizer = make_optimizer([generator], config)
    d_optimizer = make_optimizer(discriminators.values(), config)
    names = list(discriminators)
    # Accelerate sees the plain networks (DDP-wrapped), never a compiled wrapper: checkpoints
    # then hold plain keys and resume with or without compile, on any device and world size.
    prepared = accelerator.prepare(generator, *discriminators.values(), g_optimizer, d_optimizer)
    generator, g_optimizer, d_optimizer = prepared[0], prepared[-2], prepared[-1]
    discriminators = dict(zip(names, prepared[1:-2], strict=True))
    compiled = _switch(config.train.compile)
    run_generator = torch.compile(generator) if compiled else generator
    objective = gan.objective({k: torch.compile(d) if compiled else d
                               for k, d in discriminators.items()})
    if gan.encoder is not None:
        precision = resolve_encoder_precision(config, objective.real_inputs, gan.encoder_id)
        set_encoder_precision(gan.encoder, precision)
        accelerator.print(f"encoder {gan.encoder_id} runs in {precision}; real samples: "
                          + " + ".join(sorted(objective.real_inputs)))
    evaluator = make_evaluator(config, gan, accelerator.device)

    # --- state, resume, trackers ------------------------------------------------------------
    state = ckpt.TrainState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    checkpoint, damaged = ckpt.resolve_resume(run_dir, resume)
    for warning in damaged:
        accelerator.print(f"warning: {warning}")
    if resume is None and ckpt.list_checkpoints(run_dir):
        raise PathganError(f"{run_dir} already holds checkpoints: pass --resume latest to "
                           "continue that run, or choose another run.dir")
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    elif resume == "latest":
        accelerator.print(f"no checkpoint in {run_dir}; starting from step 0")
    set_seed(config.run.seed + state.step, device_specific=True)  # ...different noise per rank
    # Seeded with the step: a resumed run does not replay the data order of its first epochs.
    data = build_real_data(config, objective.real_inputs, world, accelerator.process_index,
                           gan.encoder_id, seed=config.run.seed + state.step)
    logbook = Logbook(accelerator, run_dir, config.log.wandb)
    logbook.truncate_after(state.step)
    _init_trackers(accelerator, config, state, run_dir)
    fixed_noise = noise_batch(config.log.num_samples, config.model.nz,
                              config.run.seed).to(accelerator.device)
    total_steps = (config.train.epochs * data.batches_per_epoch
                   if config.train.max_steps is None else config.train.max_steps)
    plain_generator = accelerator.unwrap_model(generator, keep_torch_compile=False)
    sample_model = ema.module if ema is not None else plain_generator

    def save_checkpoint() -> Path:
        path = ckpt.checkpoint_dir(run_dir, state.step)
        staging = ckpt.staging_dir(path)
        accelerator.save_state(str(staging))  # every rank writes its part (RNG states)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.commit_checkpoint(staging, path, state.step)
            ckpt.prune_checkpoints(run_dir, config.ckpt.keep)
            logbook.loss_plot()
        accelerator.wait_for_everyone()
        return path

    # --- the loop ---------------------------------------------------------------------------
    window = WindowStats()
    gap = EmbeddingGap() if EMBEDDINGS in discriminators else None
    nonfinite_run = 0
    saved_at = state.step
    stop = False  # a rank was signalled: every rank stops at the same step
    progress = tqdm(total=total_steps, initial=state.step, unit="step",
                    disable=not accelerator.is_main_process, desc=run_dir.name)
    try:
        while state.step < total_steps and not stop:
            for real in data:
                real = {k: v.to(accelerator.device, non_blocking=True) for k, v in real.items()}
                if IMAGES in real:  # uint8 over the bus, normalised on the device
                    real[IMAGES] = uint8_to_signed(real[IMAGES]).contiguous(
                        memory_format=memory_format)
                noise = torch.randn(per_rank_batch, config.model.nz, device=accelerator.device)

                with accelerator.autocast():  # the encoder runs in its own precision
                    real = objective.real_features(real)
                    fake = objective.fake_features(run_generator(noise))
                d_loss, d_stats = objective.d_loss(real, fake)
                d_bad, stop_requested = _reduce_flags(accelerator, _nonfinite(d_loss),
                                                      preemption.requested)
                if not d_bad:
                    d_optimizer.zero_grad(set_to_none=True)
                    accelerator.backward(d_loss)
                    d_optimizer.step()

                with contextlib.ExitStack() as no_d_sync:  # D's grads here are thrown away
                    for discriminator in discriminators.values():
                        no_d_sync.enter_context(accelerator.no_sync(discriminator))
                    g_loss, g_stats = objective.g_loss(fake)
                    (g_bad,) = _reduce_flags(accelerator, _nonfinite(g_loss))
                    if not g_bad:
                        g_optimizer.zero_grad(set_to_none=True)
                        accelerator.backward(g_loss)
                        g_optimizer.step()
                if ema is not None and not g_bad:
                    ema.update(plain_generator, state.step * config.train.batch_size,
                               config.train.batch_size)

                if d_bad or g_bad:
                    nonfinite_run += 1
                    accelerator.print(f"step {state.step}: non-finite loss "
                                      f"(D {d_loss.item():.4g}, G {g_loss.item():.4g}); skipped")
                    if config.train.nonfinite == "stop" or \
                            nonfinite_run >= config.train.max_nonfinite:
                        path = save_checkpoint()
                        raise PathganError(
                            f"non-finite loss at step {state.step} ({nonfinite_run} in a row); "
                            f"state saved in {path}. Lower train.lr, or try "
                            "train.mixed_precision=bf16 or no")
                    continue
                nonfinite_run = 0
                state.step += 1
                progress.update()
                window.add({"Loss_D": d_loss, "Loss_G": g_loss, **d_stats, **g_stats})
                if gap is not None:
                    gap.add(real[EMBEDDINGS], fake[EMBEDDINGS])

                if state.step % config.log.every == 0 or state.step == total_steps:
                    values = window.read(accelerator, config.train.batch_size)
                    values.update(epoch=state.epoch, skipped_samples=data.skipped)
                    if gap is not None:
                        values.update(gap.read(accelerator))
                        gap = EmbeddingGap()
                    logbook.metrics(state.step, values)
                    progress.set_postfix(D=f"{values['Loss_D']:.3f}", G=f"{values['Loss_G']:.3f}")
                    window = WindowStats()
                if state.step % config.log.sample_every == 0 and logbook.active:
                    logbook.samples(state.step, generate(sample_model, fixed_noise,
                                                         per_rank_batch))
                if evaluator is not None and state.step % config.eval.every == 0:
                    evaluate(evaluator, sample_model, state, logbook, config, run_dir)
                if state.step % config.ckpt.every == 0:
                    save_checkpoint()
                    saved_at = state.step
                if stop_requested or state.step >= total_steps:
                    stop = stop_requested
                    break
            else:
                state.epoch += 1
            stop = stop or _reduce_flags(accelerator, preemption.requested)[0]
    finally:
        progress.close()
        data.close()

    preempted = stop and state.step < total_steps
    if saved_at != state.step:
        save_checkpoint()
    marker = run_dir / ckpt.PREEMPTED_MARKER
    if accelerator.is_main_process:
        if preempted:
            marker.write_text(f"{state.step}\n")
            print(f"preempted at step {state.step} ({preemption.name}); checkpoint saved, "
                  "rerun with --resume latest", flush=True)
        else:
            marker.unlink(missing_ok=True)
            logbook.samples(state.step, generate(sample_model, fixed_noise, per_rank_batch))
            export_generator(sample_model, generator_config(config.model), run_dir)
            logbook.loss_plot()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(state.step, preempted, run_dir, plain_generator,
                       {k: accelerator.unwrap_model(d) for k, d in discriminators.items()})
