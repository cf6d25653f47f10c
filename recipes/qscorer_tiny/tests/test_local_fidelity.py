"""The dense full-reference training aid: local fidelity maps equal scikit-image's SSIM and CIELAB
differences region by region, references travel from a grouped shard's manifest through the dataset
(augmented with their images) to the model, and a phased run trains the tower on the maps."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import color, data
from skimage.metrics import structural_similarity

from qscorer_reward import QScorer
from qscorer_reward.training.augment import QualityPreservingAugment
from qscorer_reward.training.config import DatasetConfig, LossWeights, TrainingConfig
from qscorer_reward.training.datasets import IQADataset, IQARecord, collate_items, read_manifest, write_manifest
from qscorer_reward.training.image_ops import luma
from qscorer_reward.training.local_fidelity import local_fidelity_maps, unit_rgb_to_lab
from qscorer_reward.training.make_tiny_base import write_tiny_base
from qscorer_reward.training.model import QScorerForTraining, TrainableParts, answer_token_count
from qscorer_reward.training.synthetic_shard import SyntheticSettings, ensure_synthetic_shard
from qscorer_reward.training.trainer import ScoreTokenTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unit_image(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def pair():
    """A 56 x 84 crop of astronaut and a noisier, tinted version (unit float32 ``[H, W, 3]``)."""
    pristine = data.astronaut()[100:156, 200:284].astype(np.float32) / 255
    noise = np.random.default_rng(0).normal(0, 0.06, pristine.shape)
    distorted = np.clip(pristine + noise + np.array([0.05, 0.0, -0.04]), 0, 1).astype(np.float32)
    return pristine, distorted


def test_maps_are_scikit_image_ssim_and_cielab_difference_per_region(pair):
    pristine, distorted = pair
    maps = local_fidelity_maps(unit_image(pristine), unit_image(distorted), region=28)
    assert maps.shape == (1, 2, 2, 3) and maps.dtype == torch.float32
    _, ssim = structural_similarity(luma(pristine), luma(distorted), data_range=1.0, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False, full=True)  # fmt: skip
    difference = np.linalg.norm(color.rgb2lab(pristine) - color.rgb2lab(distorted), axis=-1)
    for row in range(2):
        for column in range(3):
            region = np.s_[28 * row : 28 * row + 28, 28 * column : 28 * column + 28]
            assert maps[0, 0, row, column] == pytest.approx(max(0.0, ssim[region].mean()), abs=1e-4)
            assert maps[0, 1, row, column] == pytest.approx(np.exp(-difference[region].mean() / 30), abs=1e-4)
    assert 0.2 < maps[0, 0].mean() < 0.9 and 0.2 < maps[0, 1].mean() < 0.9  # damaged, not destroyed
    lab = unit_rgb_to_lab(unit_image(pristine))[0].permute(1, 2, 0).numpy()
    assert np.abs(lab - color.rgb2lab(pristine)).max() < 1e-3


def test_an_image_against_itself_is_all_ones_and_shared_references_are_computed_once(pair):
    pristine, distorted = (unit_image(image) for image in pair)
    assert torch.allclose(local_fidelity_maps(pristine, pristine, 28), torch.ones(1, 2, 2, 3))
    images = torch.cat([pristine, distorted, distorted.flip(-1)])
    references = torch.cat([pristine, pristine.flip(-1)])
    index = torch.tensor([0, 0, 1])
    shared = local_fidelity_maps(references, images, 28, index)
    assert torch.allclose(shared, local_fidelity_maps(references[index], images, 28), atol=1e-6)
    assert torch.allclose(shared[2], shared[1].flip(-1), atol=1e-5)  # mirrored together: mirrored maps
    with pytest.raises(ValueError, match="multiples of the region side"):
        local_fidelity_maps(pristine, distorted, 32)
    with pytest.raises(ValueError, match="give reference_index"):
        local_fidelity_maps(references, images, 28)


def test_a_grouped_shard_names_each_images_reference_and_the_manifest_keeps_it(tmp_path):
    manifest = ensure_synthetic_shard(tmp_path / "shard", SyntheticSettings(length=8, size=32, group_size=4, workers=1))
    rows = list(csv.DictReader(manifest.open()))
    assert [row["reference"] for row in rows] == [rows[0]["image"]] * 4 + [rows[4]["image"]] * 4
    records = read_manifest(manifest)
    assert records[5].reference == manifest.parent / rows[4]["image"]
    copy = write_manifest(records, tmp_path / "copy.jsonl")
    assert [record.reference for record in read_manifest(copy)] == [record.reference for record in records]
    ungrouped = ensure_synthetic_shard(tmp_path / "plain", SyntheticSettings(length=2, size=32, workers=1))
    assert all(record.reference is None for record in read_manifest(ungrouped))


def test_the_dataset_augments_an_image_and_its_reference_alike_and_skips_a_bad_reference(tmp_path):
    generator = np.random.default_rng(1)
    for name, size in (("ref.png", (40, 48)), ("img.png", (40, 48)), ("small.png", (20, 24))):
        Image.fromarray(generator.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    records = [IQARecord(tmp_path / "img.png", 3.0, reference=tmp_path / "ref.png"),
               IQARecord(tmp_path / "small.png", 2.0, reference=tmp_path / "ref.png")]  # fmt: skip
    augment = QualityPreservingAugment(hflip=True, min_crop_side=0.6, max_pixels=40 * 48)
    dataset = IQADataset(records, augment, seed=0, with_references=True)
    image, reference = (np.asarray(Image.open(tmp_path / name)) for name in ("img.png", "ref.png"))
    flipped = 0
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0]
        assert item["valid"] and item["reference_path"] == str(tmp_path / "ref.png")
        # Find the view of the image; the reference must be the same view of the reference.
        pixels = item["pixels"].permute(1, 2, 0).numpy()
        height, width = pixels.shape[:2]
        views = [(y, x, mirror) for y in range(41 - height) for x in range(49 - width) for mirror in (False, True)
                 if np.array_equal((image[:, ::-1] if mirror else image)[y : y + height, x : x + width],
                                   pixels)]  # fmt: skip
        assert len(views) == 1
        y, x, mirror = views[0]
        flipped += mirror
        expected = (reference[:, ::-1] if mirror else reference)[y : y + height, x : x + width]
        assert np.array_equal(item["reference"].permute(1, 2, 0).numpy(), expected)
    assert 0 < flipped < 8
    skipped = dataset[1]  # its reference is another size: reported and skipped like an unreadable file
    (path, reason), *_ = skipped["failed"]
    assert not skipped["valid"] and path.endswith("small.png") and "its reference" in reason
    batch = collate_items([dataset[0], dataset[0]])
    assert len(batch["references"]) == 2 and batch["reference_paths"] == [str(tmp_path / "ref.png")] * 2
    with pytest.raises(ValueError, match="no reference image"):
        IQADataset([IQARecord(tmp_path / "img.png", 3.0)], with_references=True)


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("base") / "tiny", seed=0)


def test_the_model_predicts_every_tokens_fidelity_and_its_targets_follow_the_backbone_resize(tiny_base_dir):
    torch.manual_seed(0)
    scorer = QScorer.from_base_model(tiny_base_dir, num_score_tokens=1, min_pixels=56 * 56, max_pixels=56 * 56)
    parts = TrainableParts(lora=None, vision_tower=True, merger=True, language_model=True, vision_probe=True,
                           vision_learns_from_probe_only=True, local_fidelity=True)  # fmt: skip
    model = QScorerForTraining(scorer, parts, answer_token_count(scorer, "The quality of the image is"), False).train()
    reference = torch.rand(1, 3, 56, 56)
    images = torch.cat([reference, (reference + 0.2 * torch.rand(1, 3, 56, 56)).clamp(0, 1)])
    outputs = model(images, vision_only=True, references=reference, reference_index=torch.tensor([0, 0]))
    prediction, target = outputs["local_fidelity"], outputs["local_fidelity_target"]
    assert prediction.shape == target.shape == (8, 2)  # two images, 2 x 2 tokens of 28 px each
    assert torch.equal(target[:4], torch.full((4, 2), 5.0)) and (target[4:] < 5).all() and (target >= 1).all()
    prediction.sum().backward()  # the dense target reaches the tower
    assert all(p.grad is not None for n, p in model.named_parameters() if ".visual.blocks." in n)
    # Images at another size: targets of the images as the tower sees them (resized to 56 x 56).
    large = torch.nn.functional.interpolate(images, size=(112, 112), mode="nearest")
    resized = model(list(large), references=[large[0]], reference_index=torch.tensor([0, 0]))
    assert resized["local_fidelity_target"].shape == (8, 2)
    assert torch.equal(resized["local_fidelity_target"][:4], torch.full((4, 2), 5.0))
    with pytest.raises(ValueError, match="loss.vision_probe weight"):
        LossWeights(local_fidelity=0.1)


def test_a_phased_run_trains_on_the_local_fidelity_of_a_grouped_shard(tiny_base_dir, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    settings = SyntheticSettings(length=16, size=56, group_size=4, workers=1)
    shard = ensure_synthetic_shard(tmp_path / "shard", settings).parent
    config = TrainingConfig(
        base_model=str(tiny_base_dir), output_dir=str(tmp_path / "run"), num_score_tokens=1,
        train_datasets=[DatasetConfig(name="shard", path=str(shard), format="synthetic_iqa", synthetic=settings)],
        min_pixels=56 * 56, max_pixels=56 * 56, dtype="float32", mixed_precision="no", lora=None,
        train_vision_tower=True, train_merger=True, train_language_model=True, vision_tower_steps=2, max_steps=4,
        loss=LossWeights(mse=1.0, fidelity=1.0, vision_probe=1.0, vision_probe_only=True, local_fidelity=0.5),
        per_device_batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, logging_steps=1, num_workers=0,
        gradient_checkpointing=False, save_steps=None, save_merged=False,
    )  # fmt: skip
    trainer = ScoreTokenTrainer(config)
    trainer.train(resume=None)
    lines = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, lines) if record["event"] == "train"]
    assert len(records) == 4 and all(record["local_fidelity"] > 0 for record in records)
    assert [("mse" in record) for record in records] == [False, False, True, True]
    head = trainer.model.vision_probe.local_fidelity_layers
    assert head is not None and trainer.model.vision_probe.local_fidelity_layers[0].weight.requires_grad

    AcceleratorState._reset_state(reset_partial_state=True)
    plain = ensure_synthetic_shard(tmp_path / "plain", SyntheticSettings(length=8, size=56, workers=1)).parent
    config.train_datasets = [DatasetConfig(name="plain", path=str(plain), format="synthetic_iqa",
                                           synthetic=SyntheticSettings(length=8, size=56, workers=1))]  # fmt: skip
    with pytest.raises(ValueError, match="needs a reference image for every training record"):
        ScoreTokenTrainer(config).train(resume=None)
