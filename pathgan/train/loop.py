"""The training loop shared by the DCGAN, the Embedding GAN and the modern GAN (r3gan).

Read top to bottom: set-up (Accelerate, networks, optimizers, resume, trackers), then one loop
that calls :func:`train_step` (a discriminator update and a generator update on the same fake
batch) on endless real data until one ``done`` flag is set, with logging, samples, evaluation
and checkpoints at step boundaries; the epoch is derived from the step. A step never makes the
host wait for the device: an update whose loss is not finite is skipped on the device (and still
counts as a step), and the host reads the skips, the statistics and every rank's preemption flag
at log lines only (every ``log.every`` steps), where the run may stop. What differs between the
GANs lives in
:class:`~pathgan.train.objective.GANObjective` (the modern GAN's loss and penalties:
:class:`~pathgan.train.objective.RelativisticObjective`); the values that change over the run
(learning rate, beta2, gamma) in :mod:`pathgan.train.schedules`; where real samples come from in
:mod:`pathgan.train.real_data`; what is measured along the way in
:mod:`pathgan.train.statistics`.
"""

import contextlib
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from pathgan.config import Change, Config
from pathgan.core.devices import switch_on
from pathgan.core.errors import PathganError, writing
from pathgan.core.images import uint8_to_signed
from pathgan.evaluation.evaluator import InLoopEvaluator, eval_encoder_spec
from pathgan.models import generate, noise_batch
from pathgan.models.augment import flip_rotate
from pathgan.models.generation import calibrate_batchnorm
from pathgan.runs import RunDir, export_generator, generator_config, staging_dir
from pathgan.train import checkpoint as ckpt
from pathgan.train.build import GAN, build_gan, to_device
from pathgan.train.classes import Classes
from pathgan.train.ema import GeneratorEMA
from pathgan.train.logbook import Logbook
from pathgan.train.objective import EMBEDDINGS, IMAGES, GANObjective, batch_labels
from pathgan.train.precision import resolve_mixed_precision
from pathgan.train.real_data import build_real_data
from pathgan.train.schedules import Schedule
from pathgan.train.signals import PreemptionFlag
from pathgan.train.statistics import EmbeddingGap, SkippedUpdates, WindowStats
from pathgan.train.tracking import end_trackers, init_trackers


@dataclass
class TrainResult:
    step: int
    preempted: bool
    run_dir: Path
    generator: torch.nn.Module  # this rank's networks, unwrapped (for notebooks and tests)
    discriminators: dict[str, torch.nn.Module]
    interrupted: bool = False  # stopped by Ctrl-C: a checkpoint was saved, the run goes on later


def _memory_format(config: Config) -> torch.memory_format:
    return torch.channels_last if switch_on(config.train.channels_last) else torch.contiguous_format


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
        kwargs_handlers=[
            # D runs twice (real, fake) before one backward; broadcasting BatchNorm buffers in
            # the second forward breaks autograd (pytorch#22095). Statistics stay per rank.
            DistributedDataParallelKwargs(broadcast_buffers=False),
            # No cast weight is cached for a whole autocast region: in train_step's region D
            # runs on real and on fake images, and one cached bf16/fp16 copy of its weights
            # would sum the two passes' gradients in that precision (each pass casting its own
            # copy sums them in fp32, as when each forward was its own region).
            AutocastKwargs(cache_enabled=False),
        ],
    )


def make_optimizer(modules, config: Config, device: torch.device) -> torch.optim.Optimizer:
    """Adam, fused where torch has a fused kernel (CUDA and CPU) unless ``train.fused_adam``
    is off: only the fused kernel can skip a non-finite update on the device (``found_inf``)."""
    params = [p for module in modules for p in module.parameters()]
    fused = config.train.fused_adam == "on" or (config.train.fused_adam == "auto"
                                                 and device.type in ("cuda", "cpu"))
    return torch.optim.Adam(params, lr=config.train.lr,
                            betas=(config.train.beta1, config.train.beta2),
                            fused=fused or None, foreach=None if fused else True)


def _nonfinite_anywhere(accelerator: Accelerator, loss: torch.Tensor) -> torch.Tensor:
    """1.0 when the loss is NaN or infinite on any rank, else 0.0: a device tensor, all-reduced
    without waiting for it (the host never reads it in a step)."""
    flag = (~torch.isfinite(loss.detach()).all()).float()
    return accelerator.reduce(flag, reduction="sum").clamp_(max=1.0)


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """Whether any rank raised a host flag: one all-reduce and one read (a log boundary's)."""
    tensor = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(tensor, reduction="sum").item())


def _update(optimizer, loss: torch.Tensor, skip: torch.Tensor, accelerator: Accelerator) -> None:
    """One optimizer update from ``loss``, left out (parameters, moments and step count as they
    were) where ``skip`` is 1: by fused Adam's ``found_inf`` on the device; Adam without a fused
    kernel (``train.fused_adam=off``) reads the flag on the host instead. Under fp16 the
    GradScaler sets ``found_inf`` itself, and a non-finite loss gives non-finite gradients on
    every rank (DDP sums them), so it skips the same updates."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    inner = optimizer.optimizer  # Accelerate's wrapper passes attributes on to no one
    if inner.defaults.get("fused"):
        inner.found_inf = skip
        optimizer.step()
    elif not skip.item():
        optimizer.step()


#: samples per rank below which per-rank BatchNorm statistics are too noisy to train alike
BATCHNORM_MIN_PER_RANK = 16


def batchnorm_batch_warning(networks: list[torch.nn.Module], config: Config,
                            world: int) -> str | None:
    """The line to print when splitting the global batch over ``world`` processes leaves
    BatchNorm layers fewer than ``BATCHNORM_MIN_PER_RANK`` samples per rank to normalise over
    (a single process normalises over the batch it was given: nothing changes there)."""
    per_rank = config.train.batch_size // world
    if world == 1 or config.train.sync_bn or per_rank >= BATCHNORM_MIN_PER_RANK or not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for network in networks for m in network.modules()):
        return None
    return (f"warning: train.batch_size {config.train.batch_size} over {world} processes "
            f"leaves {per_rank} samples per rank, and the BatchNorm layers normalise over each "
            f"rank's samples: training will differ from the recipe's. Raise train.batch_size "
            f"to {BATCHNORM_MIN_PER_RANK * world} or more, or set train.sync_bn=true (CUDA)")


@dataclass
class Networks:
    """What a training step updates, as this process runs it."""

    run_generator: torch.nn.Module  # computes G(z): prepared (DDP-wrapped), maybe compiled
    plain_generator: torch.nn.Module  # unwrapped: what the EMA follows, exported without EMA
    discriminators: dict[str, torch.nn.Module]  # prepared; the objective runs them, maybe compiled
    objective: GANObjective
    g_optimizer: torch.optim.Optimizer
    d_optimizer: torch.optim.Optimizer
    ema: GeneratorEMA | None
    class_mix: torch.Tensor | None = None  # a conditional run's: how often G draws each class

    def sample_model(self, config: Config) -> torch.nn.Module:
        """The generator that draws samples, is evaluated and exported (the EMA copy if any),
        its BatchNorm statistics recomputed for its weights. Every rank calls it."""
        model = self.ema.module if self.ema is not None else self.plain_generator
        return calibrate_batchnorm(model, config.model.nz, config.run.seed)


def prepare_networks(config: Config, gan: GAN, accelerator: Accelerator) -> Networks:
    """Place the GAN's networks (SyncBatchNorm, memory format), make the optimizers and the EMA,
    prepare them with Accelerate and compile what runs each step when ``train.compile`` says so.
    """
    generator, discriminators = gan.generator, gan.discriminators
    if config.train.sync_bn and accelerator.num_processes > 1:
        generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        discriminators = {k: torch.nn.SyncBatchNorm.convert_sync_batchnorm(d)
                          for k, d in discriminators.items()}
    channels_last = switch_on(config.train.channels_last)
    generator = to_device(generator, accelerator.device, channels_last)
    discriminators = {k: to_device(d, accelerator.device, channels_last)
                      for k, d in discriminators.items()}
    ema = (GeneratorEMA(generator, config.train.ema_kimg, config.train.ema_rampup)
           if config.train.ema else None)
    g_optimizer = make_optimizer([generator], config, accelerator.device)
    d_optimizer = make_optimizer(discriminators.values(), config, accelerator.device)
    names = list(discriminators)
    # Accelerate sees the plain networks (DDP-wrapped), never a compiled wrapper: checkpoints
    # then hold plain keys and resume with or without compile, on any device and world size.
    prepared = accelerator.prepare(generator, *discriminators.values(), g_optimizer, d_optimizer)
    generator, g_optimizer, d_optimizer = prepared[0], prepared[-2], prepared[-1]
    discriminators = dict(zip(names, prepared[1:-2], strict=True))
    compiled = switch_on(config.train.compile)
    return Networks(
        run_generator=torch.compile(generator) if compiled else generator,
        plain_generator=accelerator.unwrap_model(generator, keep_torch_compile=False),
        discriminators=discriminators,
        objective=gan.objective({k: torch.compile(d) if compiled else d
                                 for k, d in discriminators.items()},
                                penalty_discriminators=discriminators,
                                loss_scale=lambda: _loss_scale(accelerator)),
        g_optimizer=g_optimizer,
        d_optimizer=d_optimizer,
        ema=ema,
        class_mix=(torch.tensor(gan.classes.mix, device=accelerator.device)
                   if gan.classes is not None else None),
    )


def _loss_scale(accelerator: Accelerator) -> float:
    """fp16's current loss scale (1 without a GradScaler): the R1/R2 penalty's inner gradient
    is taken of logits multiplied by it, against underflow (PyTorch's AMP recipe for gradient
    penalties)."""
    return accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0


def apply_schedule(nets: Networks, schedule: Schedule, step: int, batch_size: int) -> None:
    """This step's learning rate and beta2 into both optimizers, its gamma into the objective."""
    values = schedule.at(step * batch_size)
    for optimizer in (nets.g_optimizer, nets.d_optimizer):
        for group in optimizer.param_groups:
            group["lr"] = values["lr"]
            group["betas"] = (group["betas"][0], values["beta2"])
    nets.objective.start_step(step, values["gamma"])


@dataclass
class StepResult:
    d_loss: torch.Tensor
    g_loss: torch.Tensor
    stats: dict[str, torch.Tensor]  # D(x), D(G(z)), ... of this step, on this rank
    real: dict[str, torch.Tensor]  # what the discriminators saw, view by view
    fake: dict[str, torch.Tensor]
    d_skipped: torch.Tensor  # 1.0: D's loss was not finite on some rank; no rank updated D
    g_skipped: torch.Tensor  # the same for G (and its EMA)


def train_step(nets: Networks, batch: dict[str, torch.Tensor], accelerator: Accelerator,
               config: Config, step: int) -> StepResult:
    """One discriminator update and one generator update on the same fake batch.

    Nothing here makes the host wait for the device (a test counts host reads), so the CPU
    queues the next step while the device runs this one: whether a loss is finite is all-reduced
    on the device and a non-finite update is skipped there, every rank skipping the same ones.
    The loop reads what was skipped at log lines (:class:`~pathgan.train.statistics.
    SkippedUpdates`).
    """
    real = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
    if IMAGES in real:  # uint8 over the bus (or from the device cache), normalised on the device
        images = flip_rotate(real[IMAGES]) if config.data.flip_rotate else real[IMAGES]
        real[IMAGES] = uint8_to_signed(images).contiguous(memory_format=_memory_format(config))
    noise = torch.randn(config.train.batch_size // accelerator.num_processes, config.model.nz,
                        device=accelerator.device)
    labels = fake_classes(nets, real, len(noise))

    # G, D and the losses in the run's mixed precision, said here rather than left to the
    # autocast Accelerate wraps around each prepared network's forward (the same, nested; no
    # weight cast is cached, see make_accelerator); the encoder runs in its own precision (see
    # GANObjective). Backward runs outside autocast.
    with accelerator.autocast():
        real = nets.objective.real_views(real)
        fake_images = (nets.run_generator(noise) if labels is None
                       else nets.run_generator(noise, labels))
        fake = nets.objective.fake_views(fake_images, labels)
        d_loss, d_stats = nets.objective.d_loss(real, fake)
    d_skipped = _nonfinite_anywhere(accelerator, d_loss)
    _update(nets.d_optimizer, d_loss, d_skipped, accelerator)

    with contextlib.ExitStack() as no_d_sync:  # D's grads here are thrown away
        for discriminator in nets.discriminators.values():
            no_d_sync.enter_context(accelerator.no_sync(discriminator))
        with accelerator.autocast():
            g_loss, g_stats = nets.objective.g_loss(fake)
        g_skipped = _nonfinite_anywhere(accelerator, g_loss)
        _update(nets.g_optimizer, g_loss, g_skipped, accelerator)
    if nets.ema is not None:
        nets.ema.update(nets.plain_generator, step * config.train.batch_size,
                        config.train.batch_size, skip=g_skipped)
    return StepResult(d_loss, g_loss, {**d_stats, **g_stats}, real, fake, d_skipped, g_skipped)


def fake_classes(nets: Networks, real: dict[str, torch.Tensor],
                 count: int) -> torch.Tensor | None:
    """A conditional run's fake classes: those of the real samples they are paired with (the
    relativistic loss), or drawn in the mix the real batches have; None when unconditional."""
    if nets.class_mix is None:
        return None
    if nets.objective.pairs_classes:
        return batch_labels(real)
    return torch.multinomial(nets.class_mix, count, replacement=True)


def write_sample_grids(logbook: Logbook, step: int, model: torch.nn.Module, noise: torch.Tensor,
                       batch_size: int, classes: Classes | None) -> None:
    """The grid of the fixed noise; for a conditional run, its classes in blocks (in reading
    order), then the same noise drawn as each class in a grid of its own."""
    if classes is None:
        logbook.samples(step, generate(model, noise, batch_size))
        return
    count = len(classes.names)
    blocks = torch.arange(len(noise)) * count // len(noise)
    logbook.samples(step, generate(model, noise, batch_size, blocks))
    for code, name in enumerate(classes.names):
        logbook.samples(step, generate(model, noise, batch_size,
                                       torch.full((len(noise),), code)), name)


def restore_state(accelerator: Accelerator, run: RunDir, resume: str | None,
                  ema: GeneratorEMA | None) -> ckpt.TrainState:
    """The run's progress (step, W&B run id, best FD), registered for checkpointing with the EMA.
    With ``resume`` it is restored, with the prepared networks and optimizers, from that
    checkpoint; without, a run folder that already holds checkpoints is refused."""
    if accelerator.is_main_process:  # before any rank looks for a checkpoint
        ckpt.clean_unfinished(run)
    accelerator.wait_for_everyone()
    state = ckpt.TrainState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    checkpoint, damaged = ckpt.resolve_resume(run, resume)
    for warning in damaged:
        accelerator.print(f"warning: {warning}")
    if resume is None and run.checkpoints():
        raise PathganError(f"{run.path} already holds checkpoints: pass --resume latest to "
                           "continue that run, or choose another run.dir")
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    elif resume == "latest":
        accelerator.print(f"no checkpoint in {run.path}; starting from step 0")
    return state


def make_evaluator(config: Config, gan, device: torch.device):
    """The in-loop evaluator when ``eval.every`` is set; reuses the training encoder if it is
    the one asked for (Path Foundation is loaded once)."""
    if not config.eval.every:
        return None
    spec = eval_encoder_spec(config.eval.encoder, config.model.encoder)
    encoder = gan.encoder if gan.encoder is not None and spec == config.model.encoder else spec
    return InLoopEvaluator(config.data.shards, encoder=encoder, n=config.eval.n, device=device,
                           seed=config.run.seed)


def evaluate(evaluator, sample_model, state: ckpt.TrainState, logbook: Logbook,
             exported: Callable[[], dict], run: RunDir) -> None:
    """Score the generator (every rank takes part); log it and keep the best generator."""
    scores = evaluator(sample_model)
    logbook.metrics(state.step, {f"eval/{k}": scores[k] for k in
                                 ("fd", "kid_mean", "kid_std", "precision", "recall", "swd",
                                  "n")})
    fd = scores["fd"]  # None when not finite
    if fd is not None and (state.best_fd is None or fd < state.best_fd):
        state.best_fd = fd
        if logbook.active:
            export_generator(sample_model, exported(), run.best_dir)
            run.write_best({"step": state.step, **scores})


def stop_on_nonfinite(values: dict, step: int, config: Config, accelerator: Accelerator,
                      save_checkpoint) -> None:
    """At a log line: say how many updates were skipped for a non-finite loss since the last
    one, and stop (state saved) under ``train.nonfinite=stop`` or after ``train.max_nonfinite``
    steps in a row with a skipped update. Every rank reads the same figures."""
    count = values["skipped_updates_d"] + values["skipped_updates_g"]
    if not count:
        return
    in_a_row = values["nonfinite_in_a_row"]
    accelerator.print(f"step {step}: non-finite loss, {count} update(s) skipped since the last "
                      f"log line (D {values['skipped_updates_d']}, G "
                      f"{values['skipped_updates_g']}; {in_a_row} step(s) in a row now)")
    if config.train.nonfinite == "stop" or in_a_row >= config.train.max_nonfinite:
        path = save_checkpoint()
        raise PathganError(
            f"non-finite loss up to step {step} ({in_a_row} in a row); state saved in {path}. "
            "Lower train.lr, or try train.mixed_precision=bf16 or no")


def train(config: Config, resume: str | None = None,
          changes: list[Change] = ()) -> TrainResult:
    """Train (or resume, with the config changes :func:`pathgan.train.resume.plan_run` took,
    recorded at the step the resume starts from)."""
    # First of all: a preemption signal during set-up must not kill the process.
    preemption = PreemptionFlag().install()
    run = RunDir(config.run.dir)
    try:  # a file-system fault says which checkpoint is kept, and how to go on from it
        with writing(run.path, kept=lambda: ckpt.last_checkpoint_line(run),
                     rerun_args=("--resume", "latest")):
            return _train(config, resume, list(changes), preemption)
    finally:
        preemption.uninstall()


def _train(config: Config, resume: str | None, changes: list[Change],
           preemption: PreemptionFlag) -> TrainResult:
    run = RunDir(config.run.dir)
    accelerator = make_accelerator(config, run.path)
    world = accelerator.num_processes
    if config.train.batch_size % world:
        raise PathganError(f"train.batch_size {config.train.batch_size} is not divisible by "
                           f"the {world} processes")
    if config.train.sync_bn and world > 1 and accelerator.device.type != "cuda":
        raise PathganError("train.sync_bn needs CUDA; use per-rank statistics on CPU")
    per_rank_batch = config.train.batch_size // world
    if accelerator.is_main_process:
        run.write_config(config)
    set_seed(config.run.seed)  # the same initial weights on every rank...

    # --- networks, optimizers, data ---------------------------------------------------------
    gan = build_gan(config, accelerator.device)
    warning = batchnorm_batch_warning([gan.generator, *gan.discriminators.values()], config,
                                      world)
    if warning:
        accelerator.print(warning)
    nets = prepare_networks(config, gan, accelerator)
    if gan.encoder is not None:
        accelerator.print(f"encoder {gan.encoder_id} runs in {gan.encoder.precision}; real "
                          "samples: " + " + ".join(sorted(nets.objective.real_inputs)))
    evaluator = make_evaluator(config, gan, accelerator.device)

    # --- state, resume, trackers ------------------------------------------------------------
    state = restore_state(accelerator, run, resume, nets.ema)
    set_seed(config.run.seed + state.step, device_specific=True)  # ...different noise per rank
    # The cache continues its permutation from the step; streams are seeded with it, so a
    # resumed run does not replay the data order of its first epochs.
    data = build_real_data(config, nets.objective.real_inputs, accelerator, gan.encoder_id,
                           start_step=state.step, classes=gan.classes)
    if gan.classes is not None:  # the mix of this run's data, whatever a checkpoint held
        nets.plain_generator.class_mix.copy_(nets.class_mix)
        accelerator.print(f"classes: {gan.classes.describe()} train samples; batches "
                          f"{gan.classes.balance}")
    logbook = Logbook(accelerator, run, config.log.wandb)
    logbook.truncate_after(state.step)
    if accelerator.is_main_process:
        run.drop_changes_after(state.step)  # undone with the steps they ran
        if changes:
            run.record_changes(state.step, changes)
    logbook.use_wandb = init_trackers(accelerator, config, state, run)

    def exported() -> dict:  # generator.json of the generator as it is now
        return {**generator_config(config.model, gan.encoder_id, gan.classes),
                "step": state.step, "images_seen": run.images_seen(state.step),
                "mixed_precision": accelerator.mixed_precision}

    fixed_noise = noise_batch(config.log.num_samples, config.model.nz,
                              config.run.seed).to(accelerator.device)
    total_steps = (config.train.epochs * data.batches_per_epoch
                   if config.train.max_steps is None else config.train.max_steps)
    schedule = Schedule.of(config.train, total_steps)

    def save_checkpoint() -> Path:
        path = run.checkpoint_dir(state.step)
        staging = staging_dir(path)
        # a save that fails is removed at once: only a committed checkpoint is ever resumed
        with writing(staging, discard=lambda: shutil.rmtree(staging, ignore_errors=True)):
            accelerator.save_state(str(staging))  # every rank writes its part (RNG states)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                ckpt.commit_checkpoint(staging, path, state.step)
                ckpt.prune_checkpoints(run, config.ckpt.keep)
                logbook.loss_plot()
        accelerator.wait_for_everyone()
        return path

    # --- the loop ---------------------------------------------------------------------------
    window = WindowStats()
    skipped = SkippedUpdates(accelerator.device)
    gap = EmbeddingGap() if EMBEDDINGS in nets.discriminators else None
    saved_at = state.step
    stop_requested = False  # a rank was signalled: every rank stops after the same step
    done = state.step >= total_steps
    progress = tqdm(total=total_steps, initial=state.step, unit="step",
                    disable=not accelerator.is_main_process, desc=run.name)
    try:
        while not done:
            apply_schedule(nets, schedule, state.step, config.train.batch_size)
            waited = time.perf_counter()
            batch = next(data)
            window.waited(time.perf_counter() - waited)
            result = train_step(nets, batch, accelerator, config, state.step)
            state.step += 1
            progress.update()
            skipped.add(result.d_skipped, result.g_skipped)
            window.add({"Loss_D": result.d_loss, "Loss_G": result.g_loss, **result.stats},
                       taken=1.0 - torch.maximum(result.d_skipped, result.g_skipped))
            if gap is not None:
                gap.add(result.real[EMBEDDINGS], result.fake[EMBEDDINGS])
            if state.step % config.log.every == 0 or state.step == total_steps:
                # The host reads the device's figures, and every rank's signal flag, at log
                # lines only: steps in between never wait for the device.
                values = {**window.read(accelerator, config.train.batch_size),
                          **skipped.read(),
                          "epoch": (state.step - 1) // data.batches_per_epoch,  # its batch's
                          "skipped_samples": data.skipped,
                          **(gap.read(accelerator) if gap is not None else {})}
                logbook.metrics(state.step, values)
                progress.set_postfix(D=f"{values['Loss_D']:.3f}", G=f"{values['Loss_G']:.3f}")
                stop_on_nonfinite(values, state.step, config, accelerator, save_checkpoint)
                stop_requested = _any_rank(accelerator, preemption.requested)
            if state.step % config.log.sample_every == 0:
                sample_model = nets.sample_model(config)
                if logbook.active:
                    write_sample_grids(logbook, state.step, sample_model, fixed_noise,
                                       per_rank_batch, gan.classes)
            if evaluator is not None and state.step % config.eval.every == 0:
                evaluate(evaluator, nets.sample_model(config), state, logbook, exported,
                         run)
            if state.step % config.ckpt.every == 0:
                save_checkpoint()
                saved_at = state.step
            done = stop_requested or state.step >= total_steps
    finally:
        progress.close()
        data.close()

    preempted = stop_requested and state.step < total_steps
    # Ctrl-C on any rank (accelerate launch forwards it to all): every rank says the same
    interrupted = preempted and _any_rank(accelerator, preemption.interrupted)
    if saved_at != state.step:
        save_checkpoint()
    sample_model = None if preempted else nets.sample_model(config)
    if accelerator.is_main_process:
        if preempted:
            run.mark_preempted(state.step)
            if interrupted:
                print(f"interrupted at step {state.step}; checkpoint saved; rerun with "
                      "--resume latest", flush=True)
            else:
                print(f"preempted at step {state.step} ({preemption.name}); checkpoint saved, "
                      "rerun with --resume latest", flush=True)
        else:
            run.clear_preempted()
            write_sample_grids(logbook, state.step, sample_model, fixed_noise, per_rank_batch,
                               gan.classes)
            export_generator(sample_model, exported(), run.path)
            logbook.loss_plot()
    accelerator.wait_for_everyone()
    end_trackers(accelerator, run)
    return TrainResult(state.step, preempted, run.path, nets.plain_generator,
                       {k: accelerator.unwrap_model(d) for k, d in nets.discriminators.items()},
                       interrupted=interrupted)
