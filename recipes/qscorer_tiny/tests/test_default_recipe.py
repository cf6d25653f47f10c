"""The default model's recipe runs end to end: `reproduce` writes the random base and the synthetic
shards, trains two steps of ``qscorer_tiny.yaml`` (one of its vision-tower phase, one of the rest)
and writes a merged checkpoint that loads and scores without the base; and the pieces: the base's
DCT filter bank, the shards, the byte comparison with the bundled model, the probe experiment."""

import csv
import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from qscorer_reward import QScorer
from qscorer_reward.checkpoint import BUNDLED_DEFAULT
from qscorer_reward.config_files import config_from_dict, config_to_dict, load_config, save_config
from qscorer_reward.preprocessing import load_image
from recipes.qscorer_tiny import reproduce
from recipes.qscorer_tiny import vision_probe_experiment as experiment
from recipes.qscorer_tiny.make_tiny_base import dct_basis, write_tiny_base
from recipes.qscorer_tiny.reproduce import RECIPE, TinyRecipe
from recipes.qscorer_tiny.synthetic_iqa import SyntheticIQADataset
from recipes.qscorer_tiny.synthetic_shard import SyntheticSettings, ensure_synthetic_shard

SIZE = 64  # the recipe's 224 px, shrunk so that the test runs in seconds


def test_recipe_trains_and_writes_a_loadable_checkpoint(tmp_path):
    recipe = load_config(TinyRecipe, RECIPE)
    training = recipe.training
    assert training.base_model == "runs/qscorer-tiny/base" and training.save_merged
    assert (recipe.vision_tower_steps, training.max_steps) == (5600, 7600)
    training.base_model = str(tmp_path / "base")
    training.output_dir = str(tmp_path / "run")
    for spec in (*training.train_datasets, *training.eval_datasets):
        spec.path = str(tmp_path / "data" / spec.name / "manifest.csv")
    for shard in recipe.shards:
        shard.synthetic.length, shard.synthetic.size, shard.synthetic.workers = 8, SIZE, 1
    training.min_pixels = training.max_pixels = SIZE * SIZE
    training.per_device_batch_size, training.num_workers = 4, 0
    # One step of each phase: the vision tower alone, then everything.
    training.parameter_groups[-1].start_step = 1
    training.max_steps, training.eval_steps, training.save_steps, training.logging_steps = 2, 2, 2, 1
    save_config(recipe, tmp_path / "recipe.yaml")

    assert reproduce.main(["--config", str(tmp_path / "recipe.yaml")]) == 0

    run = tmp_path / "run"
    assert (run / "eval_report.json").is_file() and (tmp_path / "base" / "config.json").is_file()
    assert len(list((tmp_path / "data" / "synthetic-train").rglob("*.bmp"))) == 8
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    trained = [record for record in log if record["event"] == "train"]
    assert [("mse" in record, "vision_probe" in record) for record in trained] == [(False, True), (True, True)]
    scorer = QScorer.from_pretrained(run / "final-merged")
    assert scorer.config.model_name == "qscorer-tiny"
    scores = scorer(torch.rand(2, 3, SIZE, SIZE))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_the_byte_comparison_names_each_file_that_differs(tmp_path):
    assert reproduce.differences(BUNDLED_DEFAULT) == []
    copy = shutil.copytree(BUNDLED_DEFAULT, tmp_path / "copy")
    head = bytearray((copy / "head.safetensors").read_bytes())
    head[-1] ^= 1
    (copy / "head.safetensors").write_bytes(bytes(head))
    (copy / "tokenizer.json").unlink()
    (copy / "notes.txt").write_text("extra")
    assert reproduce.differences(copy) == ["head.safetensors", "tokenizer.json (missing)", "notes.txt (extra)"]


def test_a_recipe_whose_shards_and_datasets_disagree_is_refused(tmp_path):
    data = config_to_dict(load_config(TinyRecipe, RECIPE))
    data["shards"][0]["dataset"] = "nope"
    with pytest.raises(ValueError, match="shard for dataset 'nope'"):
        config_from_dict(TinyRecipe, data)
    data["shards"][0]["dataset"] = "synthetic-train"
    data["shards"][0]["synthetic"]["group_size"] = 2
    with pytest.raises(ValueError, match="group_size 4, its shard's 2"):
        config_from_dict(TinyRecipe, data)


def test_the_base_starts_its_patch_embedding_as_a_whitened_dct_filter_bank(tmp_path):
    from transformers import AutoModelForImageTextToText

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


def test_the_vision_probe_experiment_trains_the_base_tower_and_measures_each_gap(tmp_path):
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
