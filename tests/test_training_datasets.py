"""Manifests, image checks, the torch dataset, mixed-dataset sampling, augmentation and the synthetic set."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from noisy_crops import make_synthetic_dataset
from PIL import Image

from qscorer_reward.preprocessing import load_image
from qscorer_reward.training.augment import QualityPreservingAugment
from qscorer_reward.training.data import (
    IQADataset,
    IQARecord,
    MixtureSampler,
    check_images,
    collate_items,
    read_manifest,
    write_manifest,
)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path


def test_csv_and_jsonl_manifests_round_trip(image_folder):
    records = [
        IQARecord(image_folder / "a.png", 4.5, 0.3, "train", "g1"),
        IQARecord(image_folder / "b.png", 1.0, None, "test", None),
    ]
    for name in ("m.csv", "m.jsonl"):
        path = write_manifest(records, image_folder / name)
        assert read_manifest(path) == records
    first = json.loads((image_folder / "m.jsonl").read_text().splitlines()[0])
    assert first["image"] == "a.png"  # stored relative to the manifest


def test_manifest_paths_are_relative_to_the_manifest_or_image_root(tmp_path):
    (tmp_path / "lists").mkdir()
    path = tmp_path / "lists" / "m.csv"
    path.write_text("image,mos\nimgs/x.png,2.5\n/abs/y.png,3\n")
    records = read_manifest(path)
    assert records[0].path == tmp_path / "lists" / "imgs" / "x.png"
    assert str(records[1].path) == "/abs/y.png"
    assert read_manifest(path, image_root=tmp_path / "data")[0].path == tmp_path / "data" / "imgs" / "x.png"


def test_manifest_mos_range_is_rescaled_to_1_5(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.png", "mos": 0, "mos_std": 10}\n{"image": "b.png", "mos": 100}\n')
    records = read_manifest(path, mos_range=(0, 100))
    assert [r.mos for r in records] == [1.0, 5.0]
    assert records[0].mos_std == pytest.approx(0.4) and records[1].mos_std is None


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (
            "path,score\na.png,3\n",
            ".csv",
            r"missing the required column\(s\) \['image', 'mos'\]; found \['path', 'score'\]",
        ),
        ("image\na.png\n", ".csv", r"missing the required column\(s\) \['mos'\]"),
        ('{"image": "a.png", "mos": 3}\n{"img": "b.png", "mos": 3}\n', ".jsonl", r"line 2: manifest is missing"),
        ("image,mos\na.png,good\n", ".csv", r"row 2: mos must be a number, got 'good'"),
        ("image,mos\na.png,73\n", ".csv", r"row 2: mos 73.0 is outside 1..5; give the dataset's mos_range"),
        ('{"image": "a.png", "mos": 3\n', ".jsonl", r"line 1: not a JSON object"),
        ("image\tmos\n", ".tsv", r"must be .csv or .jsonl"),
    ],
)
def test_bad_manifests_fail_with_a_clear_message(tmp_path, content, suffix, message):
    path = tmp_path / f"manifest{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_manifest(path)


def test_check_images_reports_missing_and_unreadable_files(image_folder):
    (image_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    records = [IQARecord(image_folder / name, 3.0) for name in ("a.png", "missing.png", "corrupt.png", "b.png")]
    readable, problems = check_images(records)
    assert [r.path.name for r in readable] == ["a.png", "b.png"]
    assert [(path.name, reason.split(" (")[0]) for path, reason in problems] == [
        ("missing.png", "no such file"),
        ("corrupt.png", "cannot read image"),
    ]


def test_dataset_skips_an_image_that_fails_to_decode(image_folder):
    # A valid header with truncated data: passes the header check, fails when decoded.
    data = (image_folder / "b.png").read_bytes()
    (image_folder / "b.png").write_bytes(data[: len(data) // 2])
    records = [IQARecord(image_folder / n, mos) for n, mos in (("a.png", 2.0), ("b.png", 3.0), ("c.png", 4.0))]
    dataset = IQADataset(records)
    item = dataset[1]
    assert not item["valid"] and item["path"].endswith("c.png") and item["mos"] == 4.0
    assert item["failed"][0][0].endswith("b.png") and "cannot read image" in item["failed"][0][1]
    batch = collate_items([dataset[i] for i in range(3)])
    assert batch["valid"].tolist() == [True, False, True]
    assert batch["mos"].tolist() == [2.0, 4.0, 4.0] and len(batch["pixels"]) == 3
    assert [path for path, _ in batch["failed"]] == [str(image_folder / "b.png")]
    assert torch.equal(batch["pixels"][0], load_image(image_folder / "a.png"))  # the scorer's own loader


def test_sampler_without_weights_visits_every_image_once_per_epoch():
    sampler = MixtureSampler([5, 7], seed=3)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert sorted(orders[-1]) == list(range(12))
    assert orders[0] != orders[1]


def test_sampler_weights_set_each_datasets_share():
    sampler = MixtureSampler([10, 1000, 50], weights=[2.0, 1.0, 1.0], samples_per_epoch=400, seed=0)
    counts = Counter(0 if i < 10 else 1 if i < 1010 else 2 for i in sampler)
    assert counts == {0: 200, 1: 100, 2: 100}
    sampler.set_epoch(0)
    first = set(i for i in sampler if 10 <= i < 1010)
    sampler.set_epoch(1)
    second = set(i for i in sampler if 10 <= i < 1010)
    assert not first & second  # the large dataset's walk goes on: new images next epoch


def test_sampler_shards_are_disjoint_equal_and_resumable():
    shards = [list(MixtureSampler([11], seed=5, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sorted(i for s in shards for i in s)[:11] == sorted(set(range(11)))  # padded by repeating
    sampler = MixtureSampler([11], seed=5, num_replicas=3, rank=1)
    sampler.set_position(2)
    assert list(sampler) == shards[1][2:] and len(sampler) == 2


def test_sampler_with_groups_moves_whole_groups_and_shards_them():
    sampler = MixtureSampler([8, 12], seed=1, group_size=4)
    order = list(sampler)
    assert sorted(order) == list(range(20)) and len(sampler) == 20
    blocks = [order[i : i + 4] for i in range(0, 20, 4)]
    assert all(block == list(range(block[0], block[0] + 4)) and block[0] % 4 == 0 for block in blocks)
    assert [b[0] for b in blocks] != sorted(b[0] for b in blocks)  # the groups are shuffled
    shards = [list(MixtureSampler([12], seed=2, num_replicas=2, rank=r, group_size=4)) for r in range(2)]
    assert [len(s) for s in shards] == [8, 8]  # 3 groups over 2 processes: padded to 4 groups
    for shard in shards:
        assert all(shard[i : i + 4] == list(range(shard[i], shard[i] + 4)) for i in range(0, 8, 4))
    weighted = MixtureSampler([8, 400], weights=[1.0, 1.0], samples_per_epoch=40, seed=0, group_size=4)
    order = list(weighted)
    assert len(order) == 40 and sum(i < 8 for i in order) == 20
    with pytest.raises(ValueError, match="group_size"):
        MixtureSampler([10], group_size=4)


def test_sampler_with_groups_of_one_is_the_plain_sampler():
    assert list(MixtureSampler([5, 7], seed=3, group_size=1)) == list(MixtureSampler([5, 7], seed=3))


def test_augmentation_is_deterministic_and_keeps_the_pixel_budget():
    image = torch.arange(3 * 100 * 200, dtype=torch.int64).reshape(3, 100, 200).to(torch.uint8)
    augment = QualityPreservingAugment(hflip=True, min_crop_side=0.5, max_pixels=120 * 100)
    first = augment(image, np.random.default_rng(7))
    assert torch.equal(first, augment(image, np.random.default_rng(7)))
    shapes = [augment(image, np.random.default_rng(seed)).shape for seed in range(50)]
    assert min(h * w for _, h, w in shapes) >= 120 * 100 * 0.97  # rounding of the sides
    assert len(set(shapes)) > 1 and all(h / w == pytest.approx(0.5, abs=0.02) for _, h, w in shapes)
    small = torch.zeros(3, 40, 50, dtype=torch.uint8)  # under the budget: never cropped
    assert augment(small, np.random.default_rng(0)).shape == (3, 40, 50)
    flip_only = QualityPreservingAugment(hflip=True, min_crop_side=1.0, max_pixels=120 * 100)
    outcomes = [flip_only(image, np.random.default_rng(seed)) for seed in range(20)]
    mirrored = [torch.equal(out, image.flip(-1)) for out in outcomes]
    assert all(m or torch.equal(out, image) for m, out in zip(mirrored, outcomes))
    assert 0 < sum(mirrored) < 20


def test_dataset_augments_per_epoch_and_index(image_folder):
    augment = QualityPreservingAugment(hflip=True, min_crop_side=0.5, max_pixels=10)
    dataset = IQADataset([IQARecord(image_folder / "a.png", 3.0)], augment=augment, seed=1)
    views = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        views.append(dataset[0]["pixels"])
        assert torch.equal(views[-1], dataset[0]["pixels"])  # the same item within an epoch
    assert len({tuple(v.shape) for v in views}) > 1


def test_synthetic_set_score_is_the_known_function_of_the_distortion(tmp_path):
    manifest = make_synthetic_dataset(tmp_path, ["astronaut", "camera"], num_images=12, image_size=24, seed=0)
    records = read_manifest(manifest)
    assert len(records) == 12 and {r.group for r in records} <= {"astronaut", "camera"}
    noise = []
    for record in records:
        pixels = load_image(record.path).float() / 255
        assert pixels.shape == (3, 24, 24)
        laplacian = 4 * pixels[:, 1:-1, 1:-1] - pixels[:, 2:, 1:-1] - pixels[:, :-2, 1:-1]
        laplacian = laplacian - pixels[:, 1:-1, 2:] - pixels[:, 1:-1, :-2]
        noise.append(laplacian.abs().mean().item())
    # More noise, lower MOS: the rank correlation of high-frequency energy and MOS is strongly negative.
    from scipy.stats import spearmanr

    assert spearmanr(noise, [r.mos for r in records]).statistic < -0.8
    assert make_synthetic_dataset(tmp_path / "again", ["astronaut", "camera"], 12, image_size=24, seed=0)
    assert read_manifest(tmp_path / "again" / "manifest.csv")[3].mos == records[3].mos
