"""The modern GAN (model.kind r3gan) through the shared loop: its objective's penalty steps,
its heads (pixels, projected encoder features, the embedding), config errors, the exported
generator, a smoke run, resume and two-process DDP."""

import subprocess

import pytest
import torch
from conftest import REPO, assert_same_weights, cli_command, run_cli
from safetensors.torch import load_file
from test_train import QUIET, train_two_processes

from pathgan.config import load_config
from pathgan.core.errors import PathganError
from pathgan.encoders.base import Encoder
from pathgan.models.r3gan import R3Discriminator, R3Generator
from pathgan.runs import RunDir, build_generator, export_generator, generator_config, load_generator
from pathgan.train.build import build_networks
from pathgan.train.objective import (
    EMBEDDINGS,
    FEATURES,
    IMAGES,
    RelativisticObjective,
    gradient_penalty,
    relativistic_loss,
)

SMOKE = REPO / "configs" / "r3gan-smoke.yaml"
CNN = "timm:mobilenetv3_small_050:random"  # four stages: 56, 28, 14, 7 px
HEADS = ["model.heads={pixels: 1, projected: 0.5, embedding: 0.25}", f"model.encoder={CNN}"]
TINY = {"width": 2, "max_width": 8, "blocks": 1, "expansion": 2, "group_width": 2}


class CountingDiscriminator(torch.nn.Module):
    """A discriminator that counts its calls (which of the two the objective ran)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(images)


def test_penalty_steps_run_the_uncompiled_discriminator_with_gamma_times_the_interval():
    torch.manual_seed(0)
    inner = R3Discriminator(**TINY)
    compiled, plain = CountingDiscriminator(inner), CountingDiscriminator(inner)
    objective = RelativisticObjective({IMAGES: compiled}, {IMAGES: 1.0},
                                      penalty_discriminators={IMAGES: plain}, penalty_every=4)
    real = {IMAGES: torch.rand(2, 3, 224, 224) * 2 - 1}
    fake = {IMAGES: torch.rand(2, 3, 224, 224, requires_grad=True) * 2 - 1}

    objective.start_step(8, gamma=0.5)  # a penalty step: 8 % 4 == 0
    assert objective.gamma == 2.0
    loss, stats = objective.d_loss(real, fake)
    assert plain.calls == 2 and compiled.calls == 0 and {"R1", "R2"} <= stats.keys()
    expected = relativistic_loss(inner(real[IMAGES]), inner(fake[IMAGES])) + 2.0 / 2 * (
        stats["R1"] + stats["R2"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # the double backward runs
    assert all(p.grad is not None for p in inner.parameters())

    objective.start_step(9, gamma=0.5)  # not a penalty step
    assert objective.gamma == 0.0
    _, stats = objective.d_loss(real, fake)
    assert compiled.calls == 2 and not {"R1", "R2"} & stats.keys()
    # The generator's pairs: its fake logits against this step's real logits, kept from d_loss.
    g_loss, _ = objective.g_loss(fake)
    expected = relativistic_loss(inner(fake[IMAGES]), inner(real[IMAGES]).detach())
    assert g_loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(("override", "message"), [
    ("model.ngf=3", "model.ngf x model.expansion (3 x 2) must be a multiple of"),
    ("model.encoder=timm:vit_tiny_patch16_224:random", "unset model.encoder"),
    ("train.penalty_every=0", "train.penalty_every must be positive"),
    ("train.gamma=-1", "train.gamma cannot be negative"),
    ("model.heads={pixel: 1}", "model.heads: unknown head pixel (known: pixels, projected"),
    ("model.heads={pixels: 0}", "model.heads.pixels: a weight must be positive"),
    ("model.heads={pixels: 1, projected: 1}", "the projected head needs model.encoder"),
    (f"model.encoder={CNN}", "name one in model.heads, or unset model.encoder"),
])
def test_bad_r3gan_config_is_a_one_line_error(override, message):
    with pytest.raises(PathganError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(SMOKE, [override])


def test_a_conditional_modern_gan_has_no_projected_head():
    with pytest.raises(PathganError, match="the projected head judges no class"):
        load_config(SMOKE, ["model.conditional=true", f"model.encoder={CNN}",
                            "model.heads={pixels: 1, projected: 1}"])


def test_the_exported_generator_is_rebuilt_from_generator_json(tmp_path):
    config = load_config(SMOKE)
    gan = build_networks(config, torch.device("cpu"))
    assert isinstance(gan.generator, R3Generator) and gan.relativistic
    assert isinstance(gan.discriminators[IMAGES], R3Discriminator)
    exported = generator_config(config.model)
    assert exported["kind"] == "r3gan" and exported["noise_from"] == 28
    export_generator(gan.generator, exported, tmp_path)
    loaded, _ = load_generator(tmp_path)
    noise = torch.randn(2, config.model.nz)
    with torch.no_grad():
        assert torch.equal(loaded(noise), gan.generator.eval()(noise))
    # generator.json files from before the modern GAN carry no kind's keys: a DCGAN
    old = {"nz": 100, "ngf": 8, "channels": 3}
    assert type(build_generator(old)).__name__ == "Generator"


@pytest.fixture(scope="module")
def r3gan_run(tmp_path_factory, slide_shards):
    run_dir = tmp_path_factory.mktemp("runs") / "r3gan"
    result = subprocess.run(
        cli_command("train", "--config", SMOKE, f"data.shards={slide_shards}",
                    f"run.dir={run_dir}", "train.max_steps=4", "train.penalty_every=2",
                    "log.every=1", "log.wandb=false", "ckpt.every=2", "ckpt.keep=3",
                    "train.ema=false"),  # the exported generator is then a checkpoint's
        capture_output=True, text=True, env=QUIET, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_smoke_run_trains_penalises_every_other_step_and_exports(r3gan_run, tmp_path):
    rows = RunDir(r3gan_run).read_metrics()
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    # steps 0 and 2 (logged as 1 and 3) take R1/R2; the others do not
    assert ["R1" in row for row in rows] == [True, False, True, False]
    assert all(row["R1"] >= 0 and row["R2"] >= 0 for row in rows if "R1" in row)
    generator, config = load_generator(r3gan_run)
    assert isinstance(generator, R3Generator) and config["kind"] == "r3gan"
    assert run_cli("sample", r3gan_run, "-n", "2", "--out", tmp_path / "samples") == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    assert run_cli("arch", "--config", SMOKE, "--out", tmp_path / "arch") == 0


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(r3gan_run, slide_shards, tmp_path):
    saved = r3gan_run / "checkpoints" / "checkpoint-000002"
    run_dir = tmp_path / "resumed"
    common = [f"data.shards={slide_shards}", f"run.dir={run_dir}", "log.wandb=false",
              "train.ema=false", "log.every=1", "train.penalty_every=2"]
    # Resuming at the saved step with nothing left to do exports the restored weights as-is.
    assert run_cli("train", "--config", SMOKE, *common, "train.max_steps=2",
                   "--resume", str(saved)) == 0
    assert_same_weights(load_file(run_dir / "generator.safetensors"),
                        load_file(saved / "model.safetensors"))
    assert run_cli("train", "--config", SMOKE, *common, "train.max_steps=4",
                   "--resume", "latest") == 0
    rows = [row for row in RunDir(run_dir).read_metrics() if row["step"] > 2]
    assert [row["step"] for row in rows] == [3, 4]
    assert ["R1" in row for row in rows] == [True, False]  # the schedule goes on from step 2


@pytest.mark.slow
def test_two_process_ddp_with_penalties_in_bf16_keeps_ranks_identical(tmp_path, slide_shards):
    params = train_two_processes(tmp_path, SMOKE, tmp_path / "ddp", f"data.shards={slide_shards}",
                                 "train.max_steps=3", "train.penalty_every=2", "log.wandb=false",
                                 "ckpt.every=3", mixed_precision="bf16")
    torch.manual_seed(0)  # the trainer's seed: the initial weights moved
    initial = build_generator(generator_config(load_config(SMOKE).model))
    assert not torch.equal(params["generator.main.0.linear.weight"],
                           initial.state_dict()["main.0.linear.weight"])


def test_heads_on_encoder_features_and_embedding_are_built_with_their_weights():
    config = load_config(SMOKE, [*HEADS, "model.head_warmup=80"])
    gan = build_networks(config, torch.device("cpu"))
    assert list(gan.discriminators) == [IMAGES, FEATURES, EMBEDDINGS]
    assert gan.weights == {IMAGES: 1.0, FEATURES: 0.5, EMBEDDINGS: 0.25}
    assert gan.ramp_steps == 10  # 80 images of batches of 8
    maps = gan.encoder.features(torch.zeros(2, 3, 224, 224), gan.feature_levels)
    assert [m.shape[-1] for m in maps] == [56, 28, 14, 7]
    assert gan.discriminators[FEATURES](maps).shape == (2, 4)  # one logit per level
    assert gan.objective(gan.discriminators).real_inputs == {IMAGES}


def test_a_head_needs_an_encoder_that_gives_the_features_asked_for():
    with pytest.raises(PathganError, match=r"cannot give feature levels \[9\]"):
        build_networks(load_config(SMOKE, [*HEADS, "model.head_levels=[9]"]),
                       torch.device("cpu"))
    embedding_only = Encoder(8, "embedding-only")  # as Path Foundation's TensorFlow graph
    with pytest.raises(PathganError, match="gives its embedding only, no feature maps"):
        embedding_only.features(torch.zeros(1, 3, 224, 224), 4)


def test_encoder_heads_ramp_in_and_the_penalty_covers_every_feature_level():
    heads = {IMAGES: torch.nn.Identity(), FEATURES: torch.nn.Identity()}
    objective = RelativisticObjective(heads, {IMAGES: 1.0, FEATURES: 0.5},
                                      encoder=torch.nn.Identity(), ramp_steps=10)
    for step, expected in ((0, 0.0), (5, 0.25), (10, 0.5), (30, 0.5)):
        objective.start_step(step, gamma=1.0)
        assert objective.weights == {IMAGES: 1.0, FEATURES: pytest.approx(expected)}
    levels = [torch.randn(3, 2, 4, 4, requires_grad=True), torch.randn(3, 5, 2, 2,
                                                                       requires_grad=True)]
    logits = 2 * levels[0].sum(dim=(1, 2, 3)) + 3 * levels[1].sum(dim=(1, 2, 3))
    # d logit / d input: 2 on 32 values, 3 on 20 values, for each sample
    assert torch.allclose(gradient_penalty(logits, levels), torch.full((3,), 4.0 * 32 + 9 * 20))


@pytest.mark.slow
def test_heads_train_through_the_loop_and_are_drawn(tmp_path, slide_shards):
    run_dir = tmp_path / "heads"
    assert run_cli("train", "--config", SMOKE, f"data.shards={slide_shards}", f"run.dir={run_dir}",
                   *HEADS, "model.head_warmup=8", "train.max_steps=2", "train.penalty_every=1",
                   "train.augment=translation", "log.every=1", "log.wandb=false") == 0
    rows = RunDir(run_dir).read_metrics()
    assert rows[0]["weight/features"] == 0.0 and rows[1]["weight/features"] == 0.5
    assert all(rows[0][f"R1/{view}"] >= 0 for view in (IMAGES, FEATURES, EMBEDDINGS))
    assert run_cli("arch", "--config", SMOKE, *HEADS, "--out", tmp_path / "arch") == 0
    assert (tmp_path / "arch" / "discriminator-features.png").is_file()
