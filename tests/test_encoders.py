"""Encoders: Path Foundation through the real loading code (a tiny SavedModel in the Hub layout,
offline), the TensorFlow <-> torch gradient bridge, the one-line Hub errors, a timm backbone."""

import re

import numpy as np
import pytest
import torch

from pathgan.core.errors import PathganError
from pathgan.encoders import is_encoder_id, load_encoder, parse_spec, resolve_encoder_id
from pathgan.encoders.path_foundation import import_tensorflow

try:
    from tinymodels import TINY_COMMIT, install_in_hf_cache, make_tiny_path_foundation
except ImportError:  # tests/ as a package
    from tests.tinymodels import TINY_COMMIT, install_in_hf_cache, make_tiny_path_foundation

ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_path_foundation(tmp_path_factory.mktemp("pf") / "path-foundation")


@pytest.fixture(scope="module")
def tiny_encoder(tiny_dir):
    return load_encoder(f"path-foundation:{tiny_dir}", device="cpu", chunk_size=3)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 224, 224, generator=generator) * 2 - 1


def _tf_direct(encoder, images_signed: np.ndarray, output_gradient: np.ndarray | None = None):
    """The same computation in TensorFlow alone: [-1, 1] NCHW -> [0, 1] NHWC -> signature."""
    tf = import_tensorflow()
    x = tf.constant(images_signed)
    with tf.GradientTape() as tape:
        tape.watch(x)
        unit = tf.transpose((x + 1.0) * 0.5, [0, 2, 3, 1])
        y = encoder.bridge.signature(**{encoder.bridge.input_name: unit})["output_0"]
    gradient = None
    if output_gradient is not None:
        gradient = tape.gradient(y, x, output_gradients=tf.constant(output_gradient)).numpy()
    return y.numpy(), gradient


def test_path_foundation_local_dir_matches_tensorflow(tiny_encoder):
    encoder = tiny_encoder
    assert encoder.embed_dim == 384
    assert ID_PATTERN.match(encoder.encoder_id)
    assert re.fullmatch(r"path-foundation--[0-9a-f]{12}--unit01", encoder.encoder_id)
    images = _images(7)  # 7 images in chunks of 3: the chunking path
    with torch.no_grad():
        embeddings = encoder(images)
    assert embeddings.shape == (7, 384) and embeddings.dtype == torch.float32
    expected, _ = _tf_direct(encoder, images.numpy())
    np.testing.assert_allclose(embeddings.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_path_foundation_input_gradient_equals_gradient_tape(tiny_encoder):
    images = _images(5, seed=1).requires_grad_(True)
    embeddings = tiny_encoder(images)
    weights = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(2))
    (embeddings * weights).sum().backward()
    expected_y, expected_grad = _tf_direct(tiny_encoder, images.detach().numpy(), weights.numpy())
    np.testing.assert_allclose(embeddings.detach().numpy(), expected_y, rtol=1e-5, atol=1e-6)
    assert np.abs(expected_grad).max() > 0
    np.testing.assert_allclose(images.grad.numpy(), expected_grad, rtol=1e-4, atol=1e-9)


def test_gradient_reaches_a_generator_through_the_encoder(tiny_encoder):
    generator = torch.nn.Sequential(torch.nn.Linear(4, 3 * 224 * 224), torch.nn.Tanh())
    images = generator(torch.randn(2, 4)).view(2, 3, 224, 224)
    tiny_encoder(images).pow(2).mean().backward()
    assert generator[0].weight.grad is not None and generator[0].weight.grad.abs().sum() > 0


def test_encoder_is_frozen_and_stays_in_eval(tiny_encoder):
    assert not any(p.requires_grad for p in tiny_encoder.parameters())
    tiny_encoder.train()
    assert tiny_encoder.training is False


def test_path_foundation_hub_code_path_offline(offline_hub, tiny_dir, tiny_encoder):
    install_in_hf_cache(tiny_dir, offline_hub)
    encoder = load_encoder("path-foundation", device="cpu")
    assert encoder.encoder_id == f"path-foundation--{TINY_COMMIT[:12]}--unit01"
    assert resolve_encoder_id("path-foundation") == encoder.encoder_id
    images = _images(2, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(encoder(images).numpy(), tiny_encoder(images).numpy(),
                                   rtol=1e-6, atol=1e-7)


def test_missing_repo_offline_is_one_line(offline_hub):
    with pytest.raises(PathganError) as caught:
        load_encoder("path-foundation", device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert "https://huggingface.co/google/path-foundation" in message
    assert "hf auth login" in message


def test_gated_repo_is_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    try:
        import httpx2 as httpx
    except ImportError:  # older huggingface_hub
        import httpx
    url = "https://huggingface.co/api/models/google/path-foundation/revision/main"
    response = httpx.Response(403, request=httpx.Request("GET", url))

    def gated(*args, **kwargs):
        raise GatedRepoError("403 Client Error. Cannot access gated repo.", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(PathganError) as caught:
        load_encoder("path-foundation", device="cpu")
    message = str(caught.value)
    assert "\n" not in message and "gated" in message
    assert "accept its terms at https://huggingface.co/google/path-foundation" in message
    assert "hf auth login" in message


def test_local_dir_that_is_not_a_saved_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PathganError, match="saved_model.pb"):
        load_encoder(f"path-foundation:{tmp_path / 'empty'}", device="cpu")
    with pytest.raises(PathganError, match="does not exist"):
        load_encoder(f"path-foundation:{tmp_path / 'nowhere'}", device="cpu")


def test_resolve_id_of_a_local_dir_needs_no_model(tiny_dir, tiny_encoder):
    assert resolve_encoder_id(f"path-foundation:{tiny_dir}") == tiny_encoder.encoder_id
    assert resolve_encoder_id(tiny_encoder.encoder_id) == tiny_encoder.encoder_id


def test_spec_parsing():
    assert parse_spec("path-foundation").kind == "path-foundation"
    assert parse_spec("path-foundation:/models/pf").location == "/models/pf"
    assert parse_spec("path-foundation@abc123").revision == "abc123"
    assert parse_spec("timm:vit_small_patch16_224").pretrained
    assert not parse_spec("timm:vit_small_patch16_224:random").pretrained
    assert parse_spec("hf-hub:MahmoodLab/UNI").name == "hf-hub:MahmoodLab/UNI"
    assert is_encoder_id("path-foundation--0123456789ab--unit01")
    assert not is_encoder_id("timm:vit_small_patch16_224")
    for bad in ["", "resnet50", "timm:", "timm:vit:pretrained", "hf-hub:nothing"]:
        with pytest.raises(PathganError, match="unknown encoder spec"):
            parse_spec(bad)


@pytest.fixture(scope="module")
def timm_encoder():
    return load_encoder("timm:vit_tiny_patch16_224:random", device="cpu")


def test_timm_random_encoder(timm_encoder):
    encoder = timm_encoder
    assert encoder.embed_dim == 192
    assert ID_PATTERN.match(encoder.encoder_id)
    assert encoder.encoder_id.startswith("timm-vit_tiny_patch16_224--random-")
    assert encoder.encoder_id.endswith("--unit01-half-224")
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model.training
    images = _images(2).requires_grad_(True)
    embeddings = encoder(images)
    assert embeddings.shape == (2, 192) and embeddings.dtype == torch.float32
    embeddings.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_timm_random_init_is_the_same_in_every_process(timm_encoder):
    again = load_encoder("timm:vit_tiny_patch16_224:random", device="cpu")
    assert again.encoder_id == timm_encoder.encoder_id
    images = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(again(images), timm_encoder(images))


def test_timm_bf16_autocast_returns_float32(timm_encoder):
    timm_encoder.set_precision("bf16")
    try:
        with torch.no_grad():
            low = timm_encoder(_images(1))
    finally:
        timm_encoder.set_precision("fp32")
    with torch.no_grad():
        full = timm_encoder(_images(1))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0.1, atol=0.1)


def test_unknown_timm_model_is_one_line():
    with pytest.raises(PathganError, match="timm has no model"):
        load_encoder("timm:no_such_model_xyz:random", device="cpu")
