"""The default model's recipe runs end to end: the random base written by `make_tiny_base`, the
synthetic shards written when the run starts, two steps of ``training/configs/qscorer_tiny.yaml``
(one of its vision-tower phase, one of the rest) through ``qscorer train``, and a merged
checkpoint that loads and scores without the base."""

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from qscorer_reward import QScorer
from qscorer_reward.cli import main
from qscorer_reward.preprocessing import load_image
from qscorer_reward.training.config import DatasetConfig, TrainingConfig
from qscorer_reward.training.make_tiny_base import write_tiny_base
from qscorer_reward.training.synthetic_iqa import SyntheticIQADataset
from qscorer_reward.training.synthetic_shard import SyntheticSettings, ensure_synthetic_shard

RECIPE = Path(__file__).resolve().parents[1] / "training" / "configs" / "qscorer_tiny.yaml"
SIZE = 64  # the recipe's 224 px, shrunk so that the test runs in seconds


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide state (e.g. the mixed precision) that each run sets anew."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_recipe_trains_and_writes_a_loadable_checkpoint(tmp_path):
    config = TrainingConfig.from_file(RECIPE)
    assert config.base_model == "runs/qscorer-tiny/base" and config.save_merged
    config.base_model = str(write_tiny_base(tmp_path / "base"))
    config.output_dir = str(tmp_path / "run")
    for spec in (*config.train_datasets, *config.eval_datasets):
        spec.path = str(tmp_path / "data" / spec.name)
        spec.synthetic.length, spec.synthetic.size, spec.synthetic.workers = 8, SIZE, 1
    config.min_pixels = config.max_pixels = SIZE * SIZE
    config.per_device_batch_size, config.num_workers = 4, 0
    # One step of each phase: the vision tower alone, then everything.
    assert 0 < config.vision_tower_steps < config.max_steps
    config.vision_tower_steps, config.max_steps, config.eval_steps, config.save_steps = 1, 2, 2, 2
    config_file = tmp_path / "recipe.yaml"
    config.save(config_file)

    assert main(["train", "--config", str(config_file)]) == 0

    run = tmp_path / "run"
    assert (run / "eval_report.json").is_file()
    assert len(list((tmp_path / "data" / "synthetic-train").rglob("*.bmp"))) == 8
    scorer = QScorer.from_pretrained(run / "final-merged")
    assert scorer.config.model_name == "qscorer-tiny"
    scores = scorer(torch.rand(2, 3, SIZE, SIZE))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_the_base_starts_its_patch_embedding_as_a_whitened_dct_filter_bank(tmp_path):
    from transformers import AutoModelForImageTextToText

    from qscorer_reward.training.make_tiny_base import dct_basis

    basis = dct_basis(14)
    assert torch.allclose(basis @ basis.T, torch.eye(14, dtype=torch.float64), atol=1e-12)
    model = AutoModelForImageTextToText.from_pretrained(write_tiny_base(tmp_path / "base", seed=1))
    weight = model.model.visual.patch_embed.proj.weight.detach().double()  # [96, 3, 2, 14, 14]
    assert weight.shape == (96, 3, 2, 14, 14)
    dc = weight[0]  # luma, frequency (0, 0): a constant filter, equal on R, G, B and both frames
    assert torch.allclose(dc, dc.flatten()[0].expand_as(dc))
    flat = weight.flatten(1)
    gram = flat @ flat.T  # distinct basis functions are orthogonal
    assert torch.allclose(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), atol=1e-5)
    assert gram.diagonal()[63] > 100 * gram.diagonal()[0]  # the highest frequency, whitened up


def test_a_shard_is_reused_and_one_of_other_settings_refused(tmp_path):
    settings = SyntheticSettings(length=3, seed=5, size=32, workers=1)
    manifest = ensure_synthetic_shard(tmp_path / "shard", settings)
    written = manifest.read_text()
    assert len(written.splitlines()) == 4
    # The files hold exactly the dataset's samples (a lossless format).
    rows = list(csv.DictReader(manifest.open()))
    dataset = SyntheticIQADataset(3, seed=5, size=32)
    for index, row in enumerate(rows):
        assert torch.equal(load_image(manifest.parent / row["image"]), dataset[index]["image"])
    assert ensure_synthetic_shard(tmp_path / "shard", SyntheticSettings(length=3, seed=5, size=32)) == manifest
    assert manifest.read_text() == written
    with pytest.raises(ValueError, match="other settings"):
        ensure_synthetic_shard(tmp_path / "shard", SyntheticSettings(length=3, seed=6, size=32, workers=1))


def test_a_grouped_shard_keeps_each_group_in_one_content(tmp_path):
    manifest = ensure_synthetic_shard(tmp_path / "shard", SyntheticSettings(length=8, size=32, group_size=4, workers=2))
    rows = list(csv.DictReader(manifest.open()))
    assert [row["distortion"] == "pristine" for row in rows] == [True, False, False, False] * 2
    assert len({row["group"] for row in rows[:4]}) == 1 and rows[0]["group"] != rows[4]["group"]
    with pytest.raises(ValueError, match="divide length"):
        SyntheticSettings(length=10, group_size=4)


def test_synthetic_settings_go_with_the_synthetic_format_only():
    with pytest.raises(ValueError, match="needs the synthetic settings"):
        DatasetConfig(name="s", path="shard", format="synthetic_iqa")
    with pytest.raises(ValueError, match="needs the synthetic settings"):
        DatasetConfig(name="m", path="m.csv", synthetic=SyntheticSettings(length=4))


def test_the_vision_probe_experiment_trains_the_base_tower_and_measures_each_gap(tmp_path):
    import importlib.util

    script = RECIPE.parents[2] / "scripts" / "vision_probe_experiment.py"
    spec = importlib.util.spec_from_file_location("vision_probe_experiment", script)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    base = write_tiny_base(tmp_path / "base")
    shard = ensure_synthetic_shard(tmp_path / "shard", SyntheticSettings(length=8, size=56, group_size=4, workers=1))

    common = ["--base", str(base), "--shard", str(shard.parent), "--cache-dir", str(tmp_path / "cache"),
              "--batch-size", "8", "--dev-crops", "1"]  # fmt: skip
    summary = experiment.main(
        [*common, "--steps", "2", "--eval-every", "1", "--augment", "dihedral", "--permute-channels",
         "--optimizer", "muon", "--local-fidelity", "0.1", "--save", str(tmp_path / "tower.pt"),
         "--json", str(tmp_path / "r.json")]
    )  # fmt: skip

    assert [entry["step"] for entry in summary["history"]] == [1, 2]
    assert set(summary["per_type"]) == {"train", "held_out"}
    assert all(len(types) == 26 for types in summary["per_type"].values())
    assert (tmp_path / "r.json").is_file() and len(list((tmp_path / "cache").glob("*.npy"))) == 3
    assert all(-1 <= entry[name] <= 1 for entry in summary["history"] for name in ("train", "held_out"))
    # The saved tower and probe, evaluated without training, give the last evaluation again.
    reloaded = experiment.main(
        [*common, "--steps", "0", "--load", str(tmp_path / "tower.pt"), "--local-fidelity", "0.1"]
    )
    assert reloaded["history"][0] | {"step": 2, "seconds": 0} == summary["history"][-1] | {"seconds": 0}

    # Each augmented image is its original turned, mirrored and with its channels reordered, and
    # maps (here each image's 4 x 4 means) turn and mirror with it.
    pixels = torch.rand(6, 3, 8, 8)
    maps = torch.nn.functional.avg_pool2d(pixels, 4)
    augmented, moved_maps = experiment.augmented(pixels, np.random.default_rng(0), True, True, maps)
    assert torch.allclose(torch.nn.functional.avg_pool2d(augmented, 4).sort(1).values, moved_maps.sort(1).values)
    for original, image in zip(pixels, augmented):
        variants = [
            torch.rot90(flipped, k, dims=(-2, -1))[list(order)]
            for flipped in (original, original.flip(-1))
            for k in range(4)
            for order in itertools.permutations(range(3))
        ]
        assert any(torch.equal(image, variant) for variant in variants)
