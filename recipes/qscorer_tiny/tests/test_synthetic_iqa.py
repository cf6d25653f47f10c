"""The synthetic IQA dataset, the held-out evaluation set, its measures, and the evaluation script
end to end with the bundled model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qscorer_reward.training.data import read_manifest as read_training_manifest
from recipes.qscorer_tiny import content
from recipes.qscorer_tiny import evaluate_synthetic_quality as script
from recipes.qscorer_tiny.distortions import DISTORTION_TYPES, LEVELS
from recipes.qscorer_tiny.synthetic_evaluation import mean_srcc_interval, spearman, summarise
from recipes.qscorer_tiny.synthetic_iqa import (
    MANIFEST_COLUMNS,
    PRISTINE,
    SyntheticIQADataset,
    read_sample_rows,
    write_evaluation_set,
)

SIZE = 64


def test_samples_are_deterministic_in_seed_and_index_and_well_formed():
    dataset = SyntheticIQADataset(40, seed=3, size=SIZE)
    same_seed = SyntheticIQADataset(40, seed=3, size=SIZE)
    other_seed = SyntheticIQADataset(40, seed=4, size=SIZE)
    distortions = set()
    for index in range(len(dataset)):
        sample = dataset[index]
        again = same_seed[index]
        assert torch.equal(sample["image"], again["image"]) and sample["mos"] == again["mos"]
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, SIZE, SIZE)
        assert 1.0 <= sample["mos"] <= 5.0
        assert not sample["source"].startswith("photo:") or sample["source"][6:] in content.TRAIN_PHOTOS
        if sample["distortion"] == PRISTINE:
            assert sample["mos"] == 5.0 and sample["level"] == 0.0 and sample["implementation"] == "none"
        else:
            distortion = DISTORTION_TYPES[sample["distortion"]]
            assert 1.0 <= sample["level"] <= 5.0 and sample["mos"] < 5.0
            assert sample["implementation"] in distortion.implementations("train")
        distortions.add(sample["distortion"])
    assert PRISTINE in distortions and len(distortions) > 10
    assert not torch.equal(dataset[0]["image"], other_seed[0]["image"])
    with pytest.raises(IndexError):
        dataset[40]


def test_options_restrict_types_and_levels_and_batches_collate():
    dataset = SyntheticIQADataset(12, size=SIZE, distortions=["jpeg", "gaussian_blur"], continuous_levels=False)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=12)))
    assert batch["image"].shape == (12, 3, SIZE, SIZE) and batch["mos"].shape == (12,)
    assert set(batch["distortion"]) <= {"jpeg", "gaussian_blur", PRISTINE}
    assert all(float(level).is_integer() for level in batch["level"])
    assert SyntheticIQADataset(5, size=SIZE, pristine_fraction=1.0)[2]["distortion"] == PRISTINE
    with pytest.raises(ValueError, match="unknown or no distortion types"):
        SyntheticIQADataset(5, distortions=["jpeg", "sepia"])


def test_groups_share_one_content_image_pristine_first():
    dataset = SyntheticIQADataset(12, seed=2, size=SIZE, group_size=4)
    samples = [dataset[i] for i in range(12)]
    for group in range(3):
        members = samples[4 * group : 4 * group + 4]
        assert members[0]["distortion"] == PRISTINE and members[0]["mos"] == 5.0
        assert all(m["distortion"] != PRISTINE and m["mos"] < 5.0 for m in members[1:])
        assert len({m["source"] for m in members}) == 1
        for member in members[1:]:  # distorted versions of the pristine image, not other content
            difference = (member["image"].float() - members[0]["image"].float()).abs().mean()
            assert 0 < difference < 40
    assert not torch.equal(samples[0]["image"], samples[4]["image"])
    fresh = SyntheticIQADataset(12, seed=2, size=SIZE, group_size=4)
    assert torch.equal(fresh[6]["image"], samples[6]["image"])  # any index alone, without its group's others
    with pytest.raises(ValueError, match="group_size"):
        SyntheticIQADataset(4, group_size=0)


@pytest.fixture(scope="module")
def evaluation_set(tmp_path_factory):
    directory = tmp_path_factory.mktemp("evaluation")
    manifest = write_evaluation_set(directory, crops_per_photo=2, size=SIZE, distortions=["jpeg", "lens_blur"])
    return manifest, read_sample_rows(manifest)


def test_evaluation_set_holds_held_out_crops_with_held_out_implementations(evaluation_set):
    manifest, rows = evaluation_set
    assert manifest.read_text().splitlines()[0].split(",") == list(MANIFEST_COLUMNS)
    crops = 2 * len(content.HELD_OUT_PHOTOS)
    assert len(rows) == crops * (1 + 2 * len(LEVELS))
    for row in rows:
        assert row["image"].is_file()
        assert row["source"].removeprefix("photo:") in content.HELD_OUT_PHOTOS
        if row["distortion"] == PRISTINE:
            assert row["mos"] == 5.0 and row["level"] == 0
        else:
            assert row["implementation"] in DISTORTION_TYPES[row["distortion"]].implementations("held_out")
            assert 1.0 <= row["mos"] < 5.0


def test_evaluation_set_is_reproducible_and_a_subset_matches_the_full_set(evaluation_set, tmp_path):
    _, rows = evaluation_set
    subset = read_sample_rows(write_evaluation_set(tmp_path, crops_per_photo=1, size=SIZE, distortions=["lens_blur"]))
    by_key = {(row["group"], row["distortion"], row["level"]): row for row in rows}
    for row in subset:
        original = by_key[(row["group"], row["distortion"], row["level"])]
        assert row["image"].read_bytes() == original["image"].read_bytes()
        assert row["mos"] == original["mos"]


def test_the_training_modules_manifest_reader_takes_the_evaluation_set(evaluation_set):
    manifest, rows = evaluation_set
    records = read_training_manifest(manifest)
    assert [Path(record.path).resolve() for record in records] == [row["image"] for row in rows]
    assert [record.mos for record in records] == pytest.approx([row["mos"] for row in rows])
    assert [record.group for record in records] == [row["group"] for row in rows]


def _oracle_scores(rows, sign=1.0):
    """Scores that fall (sign 1) or rise (sign -1) with the level, identically for every crop."""
    return np.array([5.0 - sign * row["level"] for row in rows])


def test_measures_reward_a_perfect_ranking_and_punish_a_reversed_or_constant_one(evaluation_set):
    _, rows = evaluation_set
    perfect = summarise(rows, _oracle_scores(rows))
    assert perfect["mean_srcc"] == pytest.approx(1.0) and perfect["mean_within_crop_srcc"] == pytest.approx(1.0)
    assert perfect["pristine_above_level5"] == 1.0 and perfect["meets_targets"]
    assert set(perfect["per_distortion"]) == {"jpeg", "lens_blur"}
    reversed_ = summarise(rows, _oracle_scores(rows, sign=-1.0))
    assert reversed_["mean_srcc"] == pytest.approx(-1.0) and reversed_["pristine_above_level5"] == 0.0
    assert not reversed_["meets_targets"]
    constant = summarise(rows, np.full(len(rows), 3.0))
    assert constant["mean_srcc"] == 0.0 and constant["pristine_above_level5"] == 0.0


def test_pooled_srcc_counts_content_differences_and_within_crop_srcc_does_not(evaluation_set):
    _, rows = evaluation_set
    # A perfect ranker whose scores are offset per crop by more than the level range.
    offsets = {crop: 10.0 * index for index, crop in enumerate(sorted({row["group"] for row in rows}))}
    scores = np.array([offsets[row["group"]] - row["level"] for row in rows])
    summary = summarise(rows, scores)
    assert summary["mean_within_crop_srcc"] == pytest.approx(1.0)
    assert summary["mean_srcc"] < 0.5
    assert summary["pristine_above_level5"] == 1.0


def test_mean_srcc_is_also_given_per_held_out_photo(evaluation_set):
    _, rows = evaluation_set
    photos = {f"photo:{name}" for name in content.HELD_OUT_PHOTOS}
    assert summarise(rows, _oracle_scores(rows))["mean_srcc_per_source"] == {photo: 1.0 for photo in photos}
    # Ranking right on one photo only, reversed on the others.
    good = sorted(photos)[0]
    scores = np.array([5.0 - row["level"] * (1 if row["source"] == good else -1) for row in rows])
    per_source = summarise(rows, scores)["mean_srcc_per_source"]
    assert per_source[good] == pytest.approx(1.0)
    assert all(value == pytest.approx(-1.0) for photo, value in per_source.items() if photo != good)


def test_bootstrap_interval_of_the_mean_srcc_brackets_it_and_is_seeded(evaluation_set):
    _, rows = evaluation_set
    assert mean_srcc_interval(rows, _oracle_scores(rows), resamples=50) == pytest.approx((1.0, 1.0))
    noisy = _oracle_scores(rows) + np.random.default_rng(0).normal(0.0, 2.0, len(rows))
    low, high = mean_srcc_interval(rows, noisy, resamples=200)
    assert low < summarise(rows, noisy)["mean_srcc"] < high
    assert mean_srcc_interval(rows, noisy, resamples=200) == (low, high)
    assert mean_srcc_interval(rows, noisy, resamples=200, seed=1) != (low, high)
    with pytest.raises(ValueError, match="resamples"):
        mean_srcc_interval(rows, noisy, resamples=0)


def test_spearman_is_zero_without_ranking_information():
    assert spearman([1.0, 2.0, 3.0], [2.0, 4.0, 9.0]) == pytest.approx(1.0)
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


def test_evaluation_script_scores_the_bundled_model_end_to_end(tmp_path, capsys):
    arguments = ["--eval-dir", str(tmp_path / "set"), "--crops-per-photo", "1", "--size", str(SIZE)]
    arguments += ["--distortions", "jpeg,white_noise,gaussian_blur", "--json", str(tmp_path / "result.json")]
    assert script.main(arguments) == 0
    output = capsys.readouterr().out
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["per_distortion"]) == {"jpeg", "white_noise", "gaussian_blur"}
    assert result["images"] == len(content.HELD_OUT_PHOTOS) * (1 + 3 * len(LEVELS))
    assert -1.0 <= result["mean_srcc"] <= 1.0 and 0.0 <= result["pristine_above_level5"] <= 1.0
    assert result["model"] == "bundled (qscorer-tiny)" and result["evaluation_set"]["size"] == SIZE
    assert "white_noise" in output and "mean" in output and "bootstrap interval" in output
    low, high = result["mean_srcc_interval"]
    assert -1.0 <= low <= high <= 1.0
    assert set(result["mean_srcc_per_source"]) == {f"photo:{name}" for name in content.HELD_OUT_PHOTOS}

    # A second run reuses the set; a request with other settings for the same directory is refused.
    manifest_written = (tmp_path / "set" / "manifest.csv").stat().st_mtime_ns
    script.main(arguments)
    assert (tmp_path / "set" / "manifest.csv").stat().st_mtime_ns == manifest_written
    with pytest.raises(SystemExit, match="written with"):
        script.main([*arguments[:4], "--size", "96"])
