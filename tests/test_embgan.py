"""The Embedding GAN: the generator learns through a frozen encoder, in the shared loop."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file
from test_train import DDP_SCRIPT, QUIET, initial_generator_weight

from pathgan.config import load_config
from pathgan.core.images import hwc_to_chw, uint8_to_signed
from pathgan.runs import RunDir
from pathgan.shards.embedding_files import embedding_path, read_embedding_file, read_embeddings
from pathgan.shards.format import decode_sample, shard_paths
from pathgan.shards.reading import iter_tar_samples
from pathgan.train.build import build_gan, build_networks

SMOKE = REPO / "configs" / "embgan-smoke.yaml"
TIMM = "timm:vit_tiny_patch16_224:random"


@pytest.fixture(scope="module")
def embedded_shards(tmp_path_factory, slide_shards) -> tuple[Path, str]:
    """The slide shards with precomputed embeddings of the smoke config's encoder."""
    import shutil

    shards = tmp_path_factory.mktemp("embgan") / "shards"
    shutil.copytree(slide_shards, shards)
    assert run_cli("embed", shards, "--encoder", TIMM, "--batch-size", "16",
                   "--num-workers", "0") == 0
    encoder_id = next((shards / "embeddings").iterdir()).name
    return shards, encoder_id


def train_embgan(shards: Path, run_dir: Path, *overrides: str, expect: int = 0):
    result = subprocess.run(
        [sys.executable, "-m", "pathgan", "train", "--config", str(SMOKE),
         f"data.shards={shards}", f"run.dir={run_dir}", *overrides],
        capture_output=True, text=True, env=QUIET, timeout=600)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path, embedded_shards):
    shards, _ = embedded_shards
    run_dir = tmp_path / "embgan"
    train_embgan(shards, run_dir, "train.max_steps=6", "log.every=2", "log.sample_every=6",
                 "ckpt.every=6")
    rows = RunDir(run_dir).read_metrics()
    assert [row["step"] for row in rows] == [2, 4, 6]
    for row in rows:
        assert row["emb_mean_dist"] > 0 and 0 <= row["D(x)"] <= 1
        assert isinstance(row["Loss_G"], float)
    assert (run_dir / "samples" / "step_000006.png").is_file()
    assert (run_dir / "loss.png").is_file() and (run_dir / "generator.safetensors").is_file()
    assert json.loads((run_dir / "generator.json").read_text())["encoder"] == TIMM
    assert list((run_dir / "wandb").glob("offline-run-*"))


def one_generator_step(config):
    """Build the Embedding GAN's networks from a config and take one generator step (no
    Accelerate, no data)."""
    gan = build_networks(config, torch.device("cpu"))
    objective = gan.objective(gan.discriminators)
    encoder_before = {k: v.clone() for k, v in gan.encoder.state_dict().items()}
    optimizer = torch.optim.Adam(gan.generator.parameters(), lr=1e-3)
    fake = objective.fake_views(gan.generator(torch.randn(4, config.model.nz)))
    loss, _ = objective.g_loss(fake)
    loss.backward()
    optimizer.step()
    return gan, encoder_before


def test_generator_gradients_come_through_the_encoder():
    config = load_config(SMOKE)
    gan, encoder_before = one_generator_step(config)
    grads = [p.grad for p in gan.generator.parameters()]
    assert all(g is not None for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)  # every layer of G got signal
    assert all(p.grad is None and not p.requires_grad for p in gan.encoder.parameters())
    assert not gan.encoder.training
    for name, value in gan.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name
    assert set(gan.discriminators) == {"embeddings"}
    linear_layers = [m for m in gan.discriminators["embeddings"].modules()
                     if isinstance(m, torch.nn.Linear)]
    # the encoder's 192 dims, plus the minibatch-std feature
    assert [m.in_features for m in linear_layers] == [192 + 1, 64, 32]


def test_hybrid_objective_has_both_discriminators():
    config = load_config(SMOKE, ["model.hybrid=true", "model.pixel_weight=0.5"])
    gan, _ = one_generator_step(config)
    assert set(gan.discriminators) == {"images", "embeddings"}
    assert gan.weights == {"images": 0.5, "embeddings": 1.0}
    assert all(p.grad is not None for p in gan.generator.parameters())


def test_in_loop_embedding_of_a_real_patch_matches_the_precomputed_one(embedded_shards):
    shards, encoder_id = embedded_shards
    gan = build_gan(load_config(SMOKE, [f"data.shards={shards}"]), torch.device("cpu"))
    assert gan.encoder_id == encoder_id and gan.encoder.precision == "fp32"  # the stored one
    shard = shard_paths(shards)[0]
    samples = [decode_sample({"__key__": key, **members})
               for key, members in iter_tar_samples(shard)][:6]
    # Exactly what the trainer does to a real batch: uint8 CHW -> [-1, 1] -> encoder.
    batch = uint8_to_signed(torch.stack([hwc_to_chw(image) for _, image, _ in samples]))
    with torch.no_grad():
        in_loop = gan.encoder(batch)
    stored = read_embedding_file(embedding_path(shards, encoder_id, shard.name))
    rows = [list(stored["keys"]).index(key) for key, _, _ in samples]
    torch.testing.assert_close(in_loop, torch.from_numpy(stored["embeddings"][rows]),
                               rtol=1e-4, atol=1e-4)
    keys, array = read_embeddings(shards, encoder_id)
    assert array.shape == (len(keys), 192)


def test_mismatched_encoder_is_refused(tmp_path, embedded_shards):
    shards, encoder_id = embedded_shards
    result = train_embgan(shards, tmp_path / "mismatch", "log.wandb=false",
                          "model.encoder=timm:vit_tiny_patch16_224.augreg_in21k:random",
                          expect=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("pathgan: error")]
    assert len(errors) == 1 and encoder_id in errors[0] and "not from the configured" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_process_embgan_keeps_ranks_in_sync(tmp_path, embedded_shards):
    shards, _ = embedded_shards
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), str(SMOKE), f"data.shards={shards}",
               f"run.dir={run_dir}", "train.max_steps=4", "log.wandb=false", "ckpt.every=4"]
    result = subprocess.run(command, capture_output=True, text=True, env=QUIET, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(run_dir / f"params-rank{rank}.safetensors") for rank in (0, 1)]
    assert any(name.startswith("embeddings.") for name in ranks[0])
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name


@pytest.mark.slow
def test_tensorflow_bridged_encoder_trains_in_the_loop(tmp_path, slide_shards):
    import shutil

    from tinymodels import make_tiny_path_foundation

    model_dir = make_tiny_path_foundation(tmp_path / "path-foundation")
    spec = f"path-foundation:{model_dir}"
    shards = tmp_path / "shards"
    shutil.copytree(slide_shards, shards)
    embed = subprocess.run([sys.executable, "-m", "pathgan", "embed", str(shards),
                            "--encoder", spec, "--num-workers", "0"],
                           capture_output=True, text=True, env=QUIET, timeout=600)
    assert embed.returncode == 0, embed.stderr[-3000:]
    run_dir = tmp_path / "tf"
    train_embgan(shards, run_dir, f"model.encoder={spec}", "train.max_steps=3",
                 "log.every=1", "log.wandb=false")
    rows = RunDir(run_dir).read_metrics()
    assert len(rows) == 3 and all(isinstance(row["Loss_G"], float) for row in rows)
    # The generator moved: its exported weights differ from a fresh initialisation.
    trained = load_file(run_dir / "generator.safetensors")["main.0.weight"]
    assert not torch.equal(trained, initial_generator_weight())


def test_build_gan_readies_the_encoder_for_the_shard_set(embedded_shards):
    from pathgan.core.errors import PathganError

    shards, _ = embedded_shards
    with pytest.raises(PathganError, match="were computed in fp32"):
        build_gan(load_config(SMOKE, [f"data.shards={shards}", "model.encoder_precision=bf16"]),
                  torch.device("cpu"))
    # Real images encoded in the loop (augmentation): no stored precision to follow.
    augmented = build_gan(load_config(SMOKE, ["data.shards=/nowhere", "train.augment=color",
                                              "model.encoder_precision=bf16"]),
                          torch.device("cpu"))
    assert augmented.encoder.precision == "bf16" and augmented.real_inputs == {"images"}


@pytest.mark.slow
def test_the_encoder_runs_in_the_precision_of_the_real_embeddings(tmp_path, embedded_shards):
    import shutil

    shards = tmp_path / "bf16-shards"
    shutil.copytree(embedded_shards[0], shards, ignore=shutil.ignore_patterns("embeddings"))
    assert run_cli("embed", shards, "--encoder", TIMM, "--precision", "bf16",
                   "--num-workers", "0") == 0
    verify = subprocess.run([sys.executable, "-m", "pathgan", "embed", "verify", str(shards),
                             "--encoder", TIMM], capture_output=True, text=True, env=QUIET)
    assert verify.returncode == 0 and "(bf16)" in verify.stdout
    result = train_embgan(shards, tmp_path / "auto", "train.max_steps=2", "log.wandb=false")
    assert "runs in bf16; real samples: embeddings" in result.stdout + result.stderr
    refused = train_embgan(shards, tmp_path / "fp32", "train.max_steps=2", "log.wandb=false",
                           "model.encoder_precision=fp32", expect=2)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("pathgan: error")]
    assert len(errors) == 1 and "model.encoder_precision is fp32" in errors[0]
    assert "computed in bf16" in errors[0] and "Traceback" not in refused.stderr


def test_the_encoder_ignores_the_trainers_autocast():
    from pathgan.encoders import load_encoder
    from pathgan.train.objective import GANObjective

    encoder = load_encoder(TIMM, device="cpu")
    objective = GANObjective({"embeddings": torch.nn.Identity()}, {"embeddings": 1.0}, encoder)
    images = torch.rand(2, 3, 224, 224) * 2 - 1
    expected = encoder(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = objective.fake_views(images)["embeddings"]
    assert inside.dtype == torch.float32 and torch.equal(inside, expected)


@pytest.mark.slow
def test_augmented_embedding_gan_encodes_real_images_in_the_loop(tmp_path, embedded_shards):
    shards, _ = embedded_shards
    result = train_embgan(shards, tmp_path / "augmented", "train.max_steps=2", "log.wandb=false",
                          "train.augment=color,translation,cutout")
    assert "runs in fp32; real samples: images" in result.stdout + result.stderr
    assert [row["step"] for row in RunDir(tmp_path / "augmented").read_metrics()] == [2]


def test_the_embedding_discriminator_starts_with_informative_logits():
    from pathgan.models import EmbeddingDiscriminator

    torch.manual_seed(0)
    discriminator = EmbeddingDiscriminator(384, [512, 256])
    embeddings = torch.randn(256, 384)  # unit-variance features, norm ~ 20
    logits = discriminator(embeddings)
    # fan-in scaled weights: logits of order 0.1-1 from the first step, not ~0.005 x norm
    assert logits.std() > 0.05


def test_the_minibatch_std_feature_tells_a_collapsed_batch_from_a_varied_one():
    from pathgan.models.embgan import MinibatchStd

    varied = torch.randn(8, 16)
    collapsed = varied[:1].repeat(8, 1)
    layer = MinibatchStd(group_size=4)
    assert layer(varied).shape == (8, 17)
    assert torch.all(layer(collapsed)[:, -1] == 0) and torch.all(layer(varied)[:, -1] > 0.5)
    # groups interleave: samples 0 and 2 of 4 with group size 2 share a group
    spread = MinibatchStd(group_size=2)(torch.tensor([[0.0], [5.0], [2.0], [5.0]]))[:, -1]
    assert spread.tolist() == [1.0, 0.0, 1.0, 0.0]
