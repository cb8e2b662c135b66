"""Class-conditional networks, the bundled slide's tissue annotations, the stain-texture encoder
and the downstream-utility classifier's parts."""

import numpy as np
import pytest
import torch
from conftest import REPO

from pathgan.encoders import load_encoder, parse_spec
from pathgan.evaluation import utility
from pathgan.models.conditional import (
    ConditionalDiscriminator,
    ConditionalEmbeddingDiscriminator,
    ConditionalGenerator,
    ConditionalR3Discriminator,
    ConditionalR3Generator,
)
from pathgan.shards import annotations

SLIDE_XML = REPO / "shards" / "cmu_small_region.xml"


# -- networks ----------------------------------------------------------------------------------
def test_generator_draws_the_class_it_is_given():
    torch.manual_seed(0)
    generator = ConditionalGenerator(nz=16, ngf=4, num_classes=3)
    with torch.no_grad():
        for norm in generator.norms:
            torch.nn.init.normal_(norm.gain.weight, 1.0, 0.5)  # classes made distinct
        z = torch.randn(2, 16)
        # One batch (shared BatchNorm statistics): the same noise as class 0, then class 1.
        images = generator(torch.cat([z, z]), torch.tensor([0, 0, 1, 1]))
        first, second = images[:2], images[2:]
    assert first.shape == (2, 3, 224, 224)
    assert first.abs().max() <= 1.0
    assert (first - second).abs().mean() > 1e-3  # same noise, other class: another image


def test_generator_class_parameters_get_gradients():
    generator = ConditionalGenerator(nz=16, ngf=4, num_classes=2)
    labels = torch.tensor([0, 1, 1, 0])
    generator(torch.randn(4, 16), labels).square().mean().backward()
    for norm in generator.norms:
        assert norm.gain.weight.grad.abs().sum(dim=1).gt(0).all()  # both classes learn


def test_modern_generator_draws_the_class_it_is_given_and_both_classes_learn():
    torch.manual_seed(0)
    generator = ConditionalR3Generator(16, 4, max_width=16, num_classes=2)
    z = torch.randn(2, 16)
    labels = torch.tensor([0, 1])
    images = generator(torch.cat([z, z]), torch.cat([labels.flip(0), labels]))
    assert images.shape == (4, 3, 224, 224) and images.abs().max() <= 1.0
    # No BatchNorm: a sample depends on its own noise and class only, not on the batch.
    torch.testing.assert_close(images[1:2], generator(z[1:], torch.tensor([0])))
    assert (images[0] - images[3]).abs().mean() > 1e-3  # same noise, other class
    images.square().mean().backward()
    assert generator.class_embedding.weight.grad.abs().sum(dim=1).gt(0).all()


@pytest.mark.parametrize("make, inputs", [
    (lambda: ConditionalDiscriminator(ndf=4, num_classes=2), torch.randn(4, 3, 224, 224)),
    (lambda: ConditionalEmbeddingDiscriminator(32, [16, 8], num_classes=2), torch.randn(4, 32)),
    (lambda: ConditionalEmbeddingDiscriminator(32, [16], spectral_norm=True, num_classes=2),
     torch.randn(4, 32)),
    (lambda: ConditionalR3Discriminator(4, max_width=16, num_classes=2),
     torch.randn(4, 3, 224, 224)),
])
def test_projection_discriminator_judges_the_class(make, inputs):
    torch.manual_seed(0)
    discriminator = make().eval()
    with torch.no_grad():
        as_class_0 = discriminator(inputs, torch.zeros(4, dtype=torch.long))
        as_class_1 = discriminator(inputs, torch.ones(4, dtype=torch.long))
        assert as_class_0.shape == (4,)
        assert not torch.allclose(as_class_0, as_class_1)
        # The class enters through the projection alone: without it, the class does not matter.
        width = discriminator.class_embedding.weight.shape[1]
        discriminator.class_embedding = torch.nn.Embedding(2, width).requires_grad_(False)
        discriminator.class_embedding.weight.zero_()
        assert torch.allclose(discriminator(inputs, torch.zeros(4, dtype=torch.long)),
                              discriminator(inputs, torch.ones(4, dtype=torch.long)))


def test_minibatch_std_channel_sees_a_batch_that_does_not_vary():
    from pathgan.models.embgan import MinibatchStd

    alike = MinibatchStd(4)(torch.ones(8, 3, 7, 7))
    varied = MinibatchStd(4)(torch.randn(8, 3, 7, 7))
    assert alike.shape == (8, 4, 7, 7)
    assert alike[:, 3].abs().max() == 0 and varied[:, 3].min() > 0.5


# -- the bundled slide's annotations -----------------------------------------------------------
def test_bundled_annotation_names_two_tissues():
    slide = annotations.read_asap_xml(SLIDE_XML)
    assert set(slide.classes) == {"epidermis", "dermis"}
    assert slide.outside is None  # named classes: a patch outside every polygon has no label
    assert slide.label(1150, 950, 64, 0.0) == "epidermis"  # central epidermis
    assert slide.label(900, 1450, 64, 0.0) == "dermis"  # dermis left of it
    assert slide.label(100, 100, 64, 0.0) is None  # glass
    assert slide.label(1100, 2800, 64, 0.0) is None  # the excluded pale area


def test_class_fraction_rule_and_folder_convention(tmp_path):
    slide = annotations.read_asap_xml(SLIDE_XML)
    fractions = slide.class_fractions(960, 900, 224)
    assert 0.0 < fractions["epidermis"] < 1.0 and fractions["dermis"] > 0.0
    best = max(fractions, key=fractions.get)
    assert slide.label(960, 900, 224, fractions[best]) == best
    assert slide.label(960, 900, 224, min(1.0, fractions[best] + 0.01)) is None
    assert annotations.unannotated_label(SLIDE_XML.parent) is None
    camelyon = tmp_path / "camelyon"
    camelyon.mkdir()
    (camelyon / "tumor_001.xml").write_text(
        '<ASAP_Annotations><Annotations><Annotation PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="10" Y="0"/>'
        '<Coordinate Order="2" X="10" Y="10"/></Coordinates></Annotation></Annotations>'
        '</ASAP_Annotations>')
    assert annotations.unannotated_label(camelyon) == "normal"
    assert annotations.read_asap_xml(camelyon / "tumor_001.xml").outside == "normal"


# -- the stain-texture encoder -----------------------------------------------------------------
def _slide_crop(x: int, y: int) -> torch.Tensor:
    from pathgan.shards.slides import open_slide

    slide = open_slide(REPO / "shards" / "cmu_small_region.svs")
    pixels = np.array(slide.read_region((x, y), 0, (224, 224)).convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)


def test_stain_texture_reads_haematoxylin_and_eosin():
    encoder = load_encoder("stain-texture", device="cpu")
    assert parse_spec("stain-texture").kind == "stain-texture"
    assert encoder.embed_dim == 32 and "--" in encoder.encoder_id
    epidermis, dermis = _slide_crop(1150, 1300), _slide_crop(1450, 2050)
    features = encoder(torch.stack([epidermis, dermis]))
    assert features.shape == (2, 32) and features.dtype == torch.float32
    haematoxylin_mean, eosin_mean = 2, 7  # see StainTextureEncoder.forward
    assert features[0, haematoxylin_mean] > features[1, haematoxylin_mean]  # nuclei-dense
    assert features[1, eosin_mean] > features[0, eosin_mean]  # collagen-pink
    images = torch.stack([epidermis, dermis]).requires_grad_(True)
    encoder(images).sum().backward()
    assert images.grad.abs().sum() > 0  # differentiable, like every encoder


# -- the utility classifier's parts ------------------------------------------------------------
def test_linear_head_separates_and_scores():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    features = torch.randn(200, 8, generator=generator) + 3.0 * labels[:, None]
    head = utility.fit_linear_head(features, labels, 2)
    test_labels = torch.arange(100) % 2
    test = torch.randn(100, 8, generator=generator) + 3.0 * test_labels[:, None]
    scores = utility.classification_scores(head.probabilities(test), test_labels, 2)
    assert scores["accuracy"] > 0.95 and scores["auroc"] > 0.99
    flipped = utility.classification_scores(head.probabilities(test), 1 - test_labels, 2)
    assert flipped["balanced_accuracy"] < 0.05 and flipped["auroc"] < 0.01


def test_bootstrap_keeps_class_counts_and_seeds_differ():
    labels = torch.tensor([0] * 30 + [1] * 10)
    first, second = utility.bootstrap_rows(labels, 0), utility.bootstrap_rows(labels, 1)
    assert torch.bincount(labels[first]).tolist() == [30, 10]
    assert not torch.equal(first, second)
    assert utility.spread([0.5, 0.7]) == pytest.approx(
        {"mean": 0.6, "std": 0.1414, "min": 0.5, "max": 0.7}, abs=1e-4)
