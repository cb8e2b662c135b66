"""Hugging Face in and out: `pathgan push` (the card's figures come from the run, the upload
calls, the token), `pathgan sample hf-hub:...` from a Hub cache offline, and the parquet
table reader that `pathgan shards pack` reads data sets with."""

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, cli_command, run_cli
from PIL import Image
from safetensors.torch import load_file

from pathgan.config import config_to_dict, load_config
from pathgan.core.errors import PathganError
from pathgan.runs import RunDir

try:
    from tinymodels import TINY_COMMIT, install_in_hf_cache
except ImportError:  # tests/ as a package
    from tests.tinymodels import TINY_COMMIT, install_in_hf_cache

SMOKE = REPO / "configs" / "dcgan-smoke.yaml"
RUN_NAME = "tinyrun-for-hub"  # must never reach the published folder
EVAL_ENCODER = "timm:vit_tiny_patch16_224:random"  # random init: nothing to download
FILES = {"README.md", "config.yaml", "eval.json", "generator.json", "generator.safetensors",
         "loss.png", "samples.png"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, slide_shards):
    """Four DCGAN steps with an in-loop evaluation every two, then `pathgan eval` on it."""
    run_dir = tmp_path_factory.mktemp("hubruns") / RUN_NAME
    command = cli_command("train", "--config", SMOKE, f"data.shards={slide_shards}",
                          f"run.dir={run_dir}", "train.max_steps=4", "log.sample_every=2",
                          "ckpt.every=4", "log.wandb=false", "eval.every=2", "eval.n=8",
                          f"eval.encoder={EVAL_ENCODER}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_cli("eval", run_dir, "--real", slide_shards, "-n", "8",
                   "--encoder", EVAL_ENCODER) == 0
    return run_dir


@pytest.fixture(scope="module")
def card_folder(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dry") / "repo"
    assert run_cli("push", tiny_run, "--repo", "lab/tiny-dcgan", "--dry-run", folder) == 0
    return folder


def _sections(card: str) -> dict[str, str]:
    """The card's `### title` sections, by title."""
    parts = card.split("\n### ")[1:]
    return {part.split("\n", 1)[0]: part.split("\n## ", 1)[0] for part in parts}


def _rows_of(figures: dict, counts: str, space: str) -> list[str]:
    return [f"| {metric} | {value:.4g} | {counts} | {space} |" for metric, value in figures.items()]


def _texts(folder) -> str:
    return "".join(p.read_text() for p in folder.iterdir() if p.suffix in (".md", ".json",
                                                                            ".yaml"))


# -- push ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_writes_a_card_whose_figures_come_from_the_run(tiny_run, card_folder,
                                                               slide_shards):
    assert {p.name for p in card_folder.iterdir()} == FILES
    assert ((card_folder / "generator.safetensors").read_bytes()
            == (tiny_run / "generator.safetensors").read_bytes())
    assert ((card_folder / "samples.png").read_bytes()
            == (tiny_run / "samples" / "step_000004.png").read_bytes())
    assert (card_folder / "loss.png").read_bytes() == (tiny_run / "loss.png").read_bytes()
    card = (card_folder / "README.md").read_text()

    head = card.split("---\n")[1]
    metadata = yaml.safe_load(head)
    assert metadata["library_name"] == "pathgan" and {"pathgan", "dcgan"} <= set(metadata["tags"])
    assert "license" not in metadata and "\n# license: fill in" in head  # the user's choice

    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    train = config["train"]
    parameters = sum(t.numel() for t in load_file(tiny_run / "generator.safetensors").values())
    assert "| steps | 4 |" in card
    assert (f"| images seen | {4 * train['batch_size']} (steps x the global batch of each) |"
            in card)
    assert f"| mixed precision | {train['mixed_precision']} |" in card  # what ran: no (CPU)
    assert f"| batch | {train['batch_size']} (global" in card
    assert f"Adam, lr {train['lr']}, betas ({train['beta1']}, {train['beta2']})" in card
    assert f"ngf {config['model']['ngf']} " in card and f"{parameters:,} parameters" in card
    assert f"on, half-life {train['ema_kimg']} kimg, warm-up {train['ema_rampup']}" in card
    augmentation = f"DiffAugment: {train['augment']}" if train["augment"] else "none"
    assert f"| augmentation | {augmentation} |" in card

    manifest = json.loads((slide_shards / "manifest.json").read_text())
    assert f"manifest fingerprint `{manifest['fingerprint']}`" in card
    assert f"{manifest['splits']['train']['samples']} patches in its `train` split" in card

    sections = _sections(card)
    entry = json.loads((tiny_run / "eval" / "eval.json").read_text())["runs"][0]
    space = f"in `{entry['encoder']}` embeddings"
    counts = f"n = {entry['n']} generated, {entry['n_real']} real ({entry['real_split']} split)"
    figures = {k: entry[k] for k in ("fd", "kid_mean", "kid_std", "precision", "recall")}
    for row in _rows_of(figures, counts, space):
        assert row in sections[f"`pathgan eval` at step {entry['step']}"], row

    best = json.loads((tiny_run / "best" / "best.json").read_text())
    in_loop = [row for row in RunDir(tiny_run).read_metrics() if "eval/fd" in row][-1]
    figures = {k: in_loop[f"eval/{k}"] for k in ("fd", "kid_mean", "kid_std", "precision",
                                                 "recall")}
    counts = f"n = {in_loop['eval/n']} generated, {best['n_real']} real (train split)"
    for row in _rows_of(figures, counts, space):
        assert row in sections[f"Last in-loop evaluation at step {in_loop['step']}"], row
    best_section = next(text for title, text in sections.items() if title.startswith("Best")
                        and title.endswith(f"at step {best['step']}"))
    figures = {k: best[k] for k in ("fd", "kid_mean", "kid_std", "precision", "recall")}
    counts = f"n = {best['n']} generated, {best['n_real']} real (train split)"
    for row in _rows_of(figures, counts, space):
        assert row in best_section, row
    assert "pathgan sample hf-hub:lab/tiny-dcgan -n 64 --out DIR" in card


@pytest.mark.slow
def test_the_published_folder_holds_no_local_path_or_name(tiny_run, card_folder, slide_shards):
    texts = _texts(card_folder)
    for local in (str(tiny_run), RUN_NAME, str(slide_shards), slide_shards.name):
        assert local not in texts, local
    published = yaml.safe_load((card_folder / "config.yaml").read_text())
    assert "dir" not in published["run"] and "shards" not in published["data"]
    # Still a valid config: with the two local paths given back, it is the run's config.
    reloaded = config_to_dict(load_config(card_folder / "config.yaml", [
        f"run.dir={tiny_run}", f"data.shards={slide_shards}"]))
    assert reloaded == yaml.safe_load((tiny_run / "config.yaml").read_text())
    run_eval = json.loads((tiny_run / "eval" / "eval.json").read_text())
    public_eval = json.loads((card_folder / "eval.json").read_text())
    assert "shards" not in public_eval["real"] and set(public_eval["runs"][0]) == (
        set(run_eval["runs"][0]) - {"run", "name", "fake_grid", "loss_plot"})
    assert public_eval["runs"][0]["fd"] == run_eval["runs"][0]["fd"]


@pytest.mark.slow
def test_the_card_shows_every_metric_of_eval_json_with_its_space(tiny_run, tmp_path):
    """Figures added to eval.json later (SWD in pixel space, Inception FID) reach the card."""
    result = json.loads((tiny_run / "eval" / "eval.json").read_text())
    entry = result["runs"][0]
    entry.update(swd=0.01234, swd_levels=[0.5, 0.25], fid_inception=12.5,
                 inception_encoder="inception-v3-compat--weights")
    (tmp_path / "eval.json").write_text(json.dumps(result))
    out = tmp_path / "repo"
    assert run_cli("push", tiny_run, "--repo", "lab/x", "--eval", tmp_path / "eval.json",
                   "--dry-run", out) == 0
    card = (out / "README.md").read_text()
    counts = f"n = {entry['n']} generated, {entry['n_real']} real (train split)"
    pixels = "on Laplacian-pyramid 7x7 neighbourhoods of pixels"
    assert f"| swd | 0.01234 | {counts} | {pixels} |" in card
    assert f"| swd_levels | 0.5, 0.25 | {counts} | {pixels} |" in card
    assert (f"| fid_inception | 12.5 | {counts} | in `inception-v3-compat--weights` pool "
            "features |") in card
    assert json.loads((out / "eval.json").read_text())["runs"][0]["swd_levels"] == [0.5, 0.25]


@pytest.mark.slow
def test_push_best_publishes_the_best_generator(tiny_run, tmp_path, capsys):
    out = tmp_path / "repo"
    assert run_cli("push", tiny_run, "--repo", "lab/x", "--best", "--dry-run", out) == 0
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "no eval.json of `pathgan eval` scored this generator " \
        f"(looked in {tiny_run}/*/eval.json" in note and f"{tiny_run / 'best'}/*/eval.json" in note
    assert f"run `pathgan eval {tiny_run / 'best'} --real SHARDS` or pass --eval PATH" in note
    best = json.loads((tiny_run / "best" / "best.json").read_text())
    assert ((out / "generator.safetensors").read_bytes()
            == (tiny_run / "best" / "generator.safetensors").read_bytes())
    assert json.loads((out / "best.json").read_text()) == best
    card = (out / "README.md").read_text()
    assert f"| steps | {best['step']} |" in card and "best in-loop evaluation" in card
    assert not (out / "eval.json").exists()  # `pathgan eval` scored RUN, not RUN/best


@pytest.mark.slow
def test_push_errors_are_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    cases = [
        (["--repo", "lab/x"], "no Hugging Face token: run `hf auth login`"),
        (["--repo", "not-a-repo", "--dry-run", tmp_path / "a"], "is not of the form ORG/NAME"),
        (["--repo", "lab/x", "--eval", tmp_path / "none.json", "--dry-run", tmp_path / "b"],
         "no such file"),
    ]
    for options, message in cases:
        capsys.readouterr()
        assert run_cli("push", tiny_run, *options) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
    preempted = tmp_path / "preempted"
    shutil.copytree(tiny_run, preempted, ignore=shutil.ignore_patterns("checkpoints"))
    (preempted / "PREEMPTED").write_text("3\n")
    assert run_cli("push", preempted, "--repo", "lab/x", "--dry-run", tmp_path / "d") == 2
    assert "was preempted before its end" in capsys.readouterr().err
    assert run_cli("push", preempted, "--repo", "lab/x", "--best", "--dry-run",
                   tmp_path / "e") == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert run_cli("push", tiny_run, "--repo", "lab/x", "--dry-run", tmp_path / "full") == 2
    assert run_cli("push", tmp_path, "--repo", "lab/x", "--dry-run", tmp_path / "c") == 2


class FakeHub:
    """Records what `pathgan push` asks of HfApi; uploads nothing."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("token", token))

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))

    def create_branch(self, repo_id, **options):
        self.calls.append(("create_branch", repo_id, options))

    def upload_folder(self, *, repo_id, folder_path, revision, commit_message):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", repo_id, revision, commit_message, files))

        class Commit:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"
        return Commit()


@pytest.mark.slow
def test_push_uploads_the_folder_with_the_token_and_never_shows_it(tiny_run, tmp_path, capsys,
                                                                   monkeypatch):
    import huggingface_hub

    secret = "hf_secret_never_printed"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    assert run_cli("push", tiny_run, "--repo", "lab/tiny", "--private", "--revision", "v1") == 0
    output = capsys.readouterr()
    assert "https://huggingface.co/lab/tiny/commit/abc" in output.out
    assert secret not in output.out + output.err
    (_, token), create, branch, upload = FakeHub.calls
    assert token == secret
    assert create == ("create_repo", "lab/tiny", {"private": True, "exist_ok": True})
    assert branch == ("create_branch", "lab/tiny", {"branch": "v1", "exist_ok": True})
    _, repo, revision, message, files = upload
    assert (repo, revision, message) == ("lab/tiny", "v1", "pathgan push: dcgan generator at "
                                                            "step 4")
    assert set(files) == FILES and all(secret.encode() not in data for data in files.values())
    assert b"pathgan sample hf-hub:lab/tiny@v1 -n 64" in files["README.md"]
    dry = tmp_path / "dry"  # the dry run shows exactly what is uploaded
    assert run_cli("push", tiny_run, "--repo", "lab/tiny", "--revision", "v1",
                   "--dry-run", dry) == 0
    assert {p.name: p.read_bytes() for p in dry.iterdir()} == files


def _refused() -> Exception:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError("403 Forbidden", response=httpx.Response(403, request=request))


def _unreachable() -> Exception:
    from huggingface_hub.errors import HTTPError  # the HTTP client's own error type

    return HTTPError("[Errno -2] Name or service not known")


@pytest.mark.slow
@pytest.mark.parametrize(("problem", "message"), [
    (_refused, "the token may not write to lab/tiny (403)"),
    (_unreachable, "cannot reach the Hugging Face Hub to push lab/tiny: [Errno -2]"),
])
def test_a_failed_upload_is_one_line(tiny_run, capsys, monkeypatch, problem, message):
    import huggingface_hub

    class Failing(FakeHub):
        def create_repo(self, repo_id, **options):
            raise problem()

    monkeypatch.setenv("HF_TOKEN", "hf_read_only")
    monkeypatch.setattr(huggingface_hub, "HfApi", Failing)
    assert run_cli("push", tiny_run, "--repo", "lab/tiny") == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error


def test_a_local_path_foundation_and_the_embedding_gan_recipe(tmp_path):
    from pathgan.publish.model_card import RunFacts, recipe_rows
    from pathgan.publish.push import public_config

    config = load_config(REPO / "configs" / "embgan-smoke.yaml", [
        "model.encoder=path-foundation:/data/models/pf", "model.hybrid=true"])
    public, notes = public_config(config)
    assert public["model"]["encoder"] == "path-foundation" and len(notes) == 3
    assert config.model.encoder == "path-foundation:/data/models/pf"  # not modified
    facts = RunFacts(config, tmp_path, {"nz": 100, "ngf": 8, "mixed_precision": "bf16"}, 1234,
                     10, None, None, "path-foundation--0123456789ab--unit01",
                     images_seen=10 * config.train.batch_size)
    recipe = dict(recipe_rows(facts))
    assert recipe["GAN"] == "Embedding GAN (hybrid: embedding and pixel discriminators)"
    assert ("`Linear` layers [64, 32] on the embeddings of the frozen encoder `path-foundation` "
            "(id `path-foundation--0123456789ab--unit01`)") in recipe["discriminator"]
    assert "/data/models" not in str(recipe)
    assert recipe["images seen"] == (f"{10 * config.train.batch_size} (steps x the global "
                                     "batch of each)")
    assert recipe["mixed precision"] == "bf16 (train.mixed_precision no)"


def test_a_folder_naming_a_local_path_is_refused(tmp_path):
    from pathgan.publish.push import check_no_local_paths

    (tmp_path / "README.md").write_text("trained on /data/secret/slides\n")
    check_no_local_paths(tmp_path, ["/data/other"])
    with pytest.raises(PathganError, match="README.md would publish the local path"):
        check_no_local_paths(tmp_path, ["/data/secret"])


# -- sample from the Hub -------------------------------------------------------------------------
def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@pytest.mark.slow
@pytest.mark.usefixtures("offline_hub")
def test_sample_and_eval_from_the_hub_cache_offline_pin_the_commit(tiny_run, card_folder,
                                                                    tmp_path, capsys,
                                                                    slide_shards):
    install_in_hf_cache(card_folder, _hub_cache(), repo_id="lab/tiny-dcgan")
    install_in_hf_cache(card_folder, _hub_cache(), repo_id="lab/tiny-dcgan", ref="v1")
    pinned = f"hf-hub:lab/tiny-dcgan@{TINY_COMMIT}"

    assert run_cli("sample", "hf-hub:lab/tiny-dcgan", "-n", "3", "--out", tmp_path / "hub") == 0
    record = json.loads((tmp_path / "hub" / "sample.json").read_text())
    assert record["run"] == pinned and record["count"] == 3
    assert record["hub"] == {"repo": "lab/tiny-dcgan", "revision": "main", "commit": TINY_COMMIT}
    assert run_cli("sample", tiny_run, "-n", "3", "--out", tmp_path / "local") == 0
    for path in (tmp_path / "local").glob("*.png"):  # the same generator, the same patches
        assert path.read_bytes() == (tmp_path / "hub" / path.name).read_bytes()

    out = tmp_path / "shards"
    assert run_cli("sample", "hf-hub:lab/tiny-dcgan@v1", "-n", "2", "--out", out,
                   "--format", "shards") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["run"] == pinned
    assert manifest["config"]["hub"] == {"repo": "lab/tiny-dcgan", "revision": "v1",
                                         "commit": TINY_COMMIT}
    with tarfile.open(out / "train-000000.tar") as tar:
        metadata = [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    assert [m["run"] for m in metadata] == [pinned, pinned]

    # pathgan eval takes the same spec: named after the repo, pinned, written outside the cache
    evaluated = tmp_path / "eval"
    assert run_cli("eval", "hf-hub:lab/tiny-dcgan", "--real", slide_shards, "-n", "6",
                   "--encoder", "timm:mobilenetv3_small_050:random", "--out", evaluated) == 0
    (entry,) = json.loads((evaluated / "eval.json").read_text())["runs"]
    assert entry["run"] == pinned and entry["name"] == "tiny-dcgan"
    assert entry["hub"]["commit"] == TINY_COMMIT and (evaluated / "tiny-dcgan-fake.png").is_file()

    capsys.readouterr()
    for spec, message in (("hf-hub:lab/missing", "not in the local Hugging Face cache"),
                          ("hf-hub:nope", "is not a Hub generator")):
        assert run_cli("sample", spec, "-n", "1", "--out", tmp_path / "x") == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error


# -- the table reader ----------------------------------------------------------------------------
def _encoded(width: int, height: int, seed: int, mode: str = "RGB", image_format="PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=image_format)
    return buffer.getvalue()


CLASS_NAMES = ["normal", "tumor"]


def _write_table(path, images: list, labels: list, groups: list, embeddings: list,
                 hf_struct: bool = True) -> None:
    """A parquet file as the Hub stores data sets: an Image struct and a ClassLabel column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_column = ([{"bytes": data, "path": None} for data in images] if hf_struct
                    else pa.array(images, pa.binary()))
    table = pa.table({"image": image_column, "label": pa.array(labels, pa.int64()),
                      "slide": groups,
                      "emb": pa.array(embeddings, pa.list_(pa.float32()))})
    features = {"label": {"_type": "ClassLabel", "names": CLASS_NAMES}}
    table = table.replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture
def patch_table(tmp_path):
    """Two files of five patches of various sizes and modes, one label (-1: none, as the Hub
    writes it), group and embedding each."""
    root = tmp_path / "patches"
    sizes = [(96, 96, "RGB"), (300, 200, "RGBA"), (224, 224, "L"), (512, 512, "RGB"),
             (50, 80, "RGB")]
    images = [_encoded(w, h, seed, mode) for seed, (w, h, mode) in enumerate(sizes)]
    embeddings = [[float(i), i + 0.5, -i, 1.0] for i in range(5)]
    _write_table(root / "data" / "train-0.parquet", images[:3], [0, 1, 0], ["a", "a", "b"],
                 embeddings[:3])
    _write_table(root / "data" / "train-1.parquet", images[3:], [1, -1], ["c", "c"],
                 embeddings[3:])
    return root, images, sizes, embeddings


def test_table_rows_are_patches_resized_like_pack(patch_table, tmp_path):
    from pathgan.shards.patches import read_patch_image
    from pathgan.shards.tables import PatchTable, TableColumns

    root, images, sizes, embeddings = patch_table
    table = PatchTable(str(root), TableColumns(label="label", group="slide", embedding="emb"))
    assert table.num_rows == 5
    rows = list(table.rows(batch_rows=2))
    assert [row.row_id for row in rows] == [
        "data_train-0-r00000000", "data_train-0-r00000001", "data_train-0-r00000002",
        "data_train-1-r00000000", "data_train-1-r00000001"]
    assert [row.label for row in rows] == ["normal", "tumor", "normal", "tumor", None]
    assert [row.group for row in rows] == ["a", "a", "b", "c", "c"]
    for row, data, (width, height, _), embedding in zip(rows, images, sizes, embeddings,
                                                        strict=True):
        file = tmp_path / f"{row.row_id}.png"
        file.write_bytes(data)
        expected, _ = read_patch_image(file, 224)
        assert row.image.dtype == np.uint8 and row.image.shape == (224, 224, 3)
        np.testing.assert_array_equal(row.image, expected)  # pack's own resize
        assert row.original_size == (width, height) and row.skipped is None
        np.testing.assert_array_equal(row.embedding, np.float32(embedding))


def test_raw_bytes_columns_and_a_corrupt_row(tmp_path):
    from pathgan.shards.tables import PatchTable, TableColumns

    images = [_encoded(64, 64, 0, image_format="JPEG"), b"not an image", _encoded(32, 32, 1)]
    path = tmp_path / "raw.parquet"
    _write_table(path, images, [0, 1, 0], ["g"] * 3, [[0.0]] * 3, hf_struct=False)
    rows = list(PatchTable(str(path)).rows())
    assert [row.row_id for row in rows] == ["raw-r00000000", "raw-r00000001", "raw-r00000002"]
    same = list(PatchTable(str(path), TableColumns(label="slide", group="slide")).rows())
    assert [(row.label, row.group) for row in same] == [("g", "g")] * 3
    assert rows[0].image.shape == (224, 224, 3) and rows[2].image.shape == (224, 224, 3)
    assert rows[1].image is None and "UnidentifiedImageError" in rows[1].skipped
    assert rows[0].label is None and rows[0].embedding is None  # columns not asked for


@pytest.mark.usefixtures("offline_hub")
def test_a_hub_data_set_from_the_local_cache(patch_table):
    from pathgan.shards.tables import PatchTable, TableColumns

    root, *_ = patch_table
    cache = _hub_cache()
    install_in_hf_cache(root, cache, repo_id="lab/patches")
    # a data set's cache layout is a model's under another prefix
    (cache / "models--lab--patches").rename(cache / "datasets--lab--patches")
    columns = TableColumns(label="label")
    from_hub = list(PatchTable("hf-dataset:lab/patches", columns).rows())
    local = list(PatchTable(str(root), columns).rows())
    assert [r.row_id for r in from_hub] == [r.row_id for r in local]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(from_hub, local, strict=True))
    with pytest.raises(PathganError, match="not in the local Hugging Face cache: download it "
                                           "first with `hf download lab/absent --repo-type"):
        PatchTable("hf-dataset:lab/absent")


def test_table_errors_are_one_line(patch_table, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pathgan.shards.tables import PatchTable, TableColumns

    root, *_ = patch_table
    (tmp_path / "empty").mkdir()
    pq.write_table(pa.table({"image": [1, 2], "label": [0, 1]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"image": [b"garbage", b"more"]}), tmp_path / "garbage.parquet")
    pq.write_table(pa.table({"image": [_encoded(8, 8, 0)], "emb": ["x"]}),
                   tmp_path / "textemb.parquet")
    cases = [
        (tmp_path / "absent.parquet", TableColumns(), "no such file or folder"),
        (tmp_path / "empty", TableColumns(), "no .parquet files in it"),
        (root, TableColumns(image="img"), "has no column 'img' (its columns: image, label, "
                                          "slide, emb)"),
        (root, TableColumns(label="diagnosis"), "has no column 'diagnosis'"),
        (tmp_path / "ints.parquet", TableColumns(), "unsupported image encoding in "
                                                    "ints.parquet: column 'image' holds int64"),
        (tmp_path / "garbage.parquet", TableColumns(), "its first image cannot be decoded"),
        (tmp_path / "textemb.parquet", TableColumns(embedding="emb"), "not a list of numbers"),
        ("hf-dataset:not a repo", TableColumns(), "is not a Hub data set"),
    ]
    for source, columns, message in cases:
        with pytest.raises(PathganError) as caught:
            PatchTable(str(source), columns)
        assert message in str(caught.value) and "\n" not in str(caught.value), caught.value
