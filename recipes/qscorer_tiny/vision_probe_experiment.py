"""Train a base model's vision tower with the vision probe alone, without the language model, and
measure where it fails to generalise (README.md).

The tower and probe of a `qscorer-tiny` run cost about half a training step, so this is the quick
way to try tower-side changes (shape, initialisation, data, schedule) before a full run::

    python -m recipes.qscorer_tiny.vision_probe_experiment --base runs/qscorer-tiny/base \\
        --shard runs/qscorer-tiny/data/train --eval-dir runs/synthetic-eval --steps 1200

Training: batches of whole groups of the (grouped) synthetic shard, horizontal flips, AdamW (or
Muon) with a linear warm-up and cosine decay, the probe's MSE (and optionally the fidelity loss),
gradient norm clipped at 1, as in the recipe. Every ``--eval-every`` steps and at the end it
prints the mean per-type SRCC (`synthetic_evaluation.summarise`) on three sets: new crops of the
training photos with the training implementations and with the held-out ones (written to
``--cache-dir`` on first use), and the held-out evaluation set in ``--eval-dir``
(`evaluate_synthetic_quality.py` writes it). The shard and the sets are decoded once into
``.npy`` files in ``--cache-dir``.

``--local-fidelity W`` adds a dense local-fidelity term (`local_fidelity.py`) with weight W (maps against
each group's pristine image, computed before the channels are permuted).
``--augment dihedral`` also turns images by multiples of 90 degrees and ``--permute-channels``
reorders their RGB channels (content variety at no data cost); ``--optimizer muon`` trains with
Muon (`optimizers.MuonWithAdamW`). ``--save`` writes the tower and probe at every
evaluation, ``--load`` starts from such a file, and ``--steps 0 --load FILE`` only evaluates it
(e.g. towers trained elsewhere with ``--device cuda``); ``--dev-crops 0`` skips the development
sets.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qscorer_reward.backbones.qwen_vl import patchify
from qscorer_reward.config import QScorerConfig
from qscorer_reward.preprocessing import normalize
from qscorer_reward.training.losses import fidelity_loss, score_mse_loss

from .content import TRAIN_PHOTOS, photo_crop
from .distortions import DISTORTION_TYPES
from .image_ops import to_uint8
from .local_fidelity import local_fidelity_maps
from .optimizers import MuonWithAdamW, muon_parameter_names
from .synthetic_evaluation import summarise
from .synthetic_iqa import distorted_versions, read_sample_rows
from .vision_probe import VisionProbe

SCORE_MIDPOINT = 3.0  # of the 1..5 scale, where the probe's output starts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="base model folder (make_tiny_base)")
    parser.add_argument("--shard", type=Path, required=True, help="grouped synthetic shard folder (its manifest.csv)")
    parser.add_argument("--eval-dir", type=Path, help="held-out evaluation set folder (optional)")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/vision-probe-cache"))
    parser.add_argument(
        "--dev-crops", type=int, default=20, help="training-photo crops per development set (0: no development sets)"
    )
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--eval-every", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=4, help="the shard's group size")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--fidelity", type=float, default=0.0, help="weight of the fidelity loss beside the MSE")
    parser.add_argument(
        "--augment",
        choices=("hflip", "dihedral"),
        default="hflip",
        help="hflip: mirror half the images (the recipe's); dihedral: also turn the (square) images by "
        "multiples of 90 degrees",
    )
    parser.add_argument("--permute-channels", action="store_true", help="shuffle the RGB channels of each image")
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "muon"),
        default="adamw",
        help="muon: Muon for the hidden weight matrices, AdamW for the rest (optimizers.MuonWithAdamW)",
    )
    parser.add_argument(
        "--local-fidelity",
        type=float,
        default=0.0,
        help="weight of a dense auxiliary loss (local_fidelity.py): every merged token "
        "predicts its region's local fidelity against the group's pristine image",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--load", type=Path, help="start from this saved tower and probe (--save's file)")
    parser.add_argument("--save", type=Path, help="save the tower and probe here at every evaluation and the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the evaluations to this file")
    return parser.parse_args(argv)


def decoded_images(rows: list[dict], cache: Path) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` of the manifest ``rows`` (`read_sample_rows`'s), memory-mapped from
    ``cache`` (written on first use)."""
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, np.stack([np.asarray(Image.open(row["image"]).convert("RGB")) for row in rows]))
    return np.load(cache, mmap_mode="r")


def development_set(cache: Path, crops: int, split: str, size: int, seed: int = 12345):
    """New crops of the training photos, each pristine and with every type at levels 1..5 with the
    ``split`` implementations: (rows as `summarise` reads them, uint8 images), cached."""
    meta = cache.with_suffix(".json")
    if not cache.exists():
        rng = np.random.default_rng(seed)
        passes = math.ceil(crops / len(TRAIN_PHOTOS))  # each photo once per pass, in a new order
        order = np.concatenate([rng.permutation(len(TRAIN_PHOTOS)) for _ in range(passes)])
        rows, images = [], []
        for index in range(crops):
            photo = TRAIN_PHOTOS[order[index]]
            try:
                pristine = photo_crop(photo, size, np.random.default_rng([seed, index]))
            except ValueError:  # a photo smaller than the crop
                continue
            group = f"{photo}_{index}"
            rows.append(dict(distortion="pristine", level=0.0, mos=5.0, group=group))
            images.append(to_uint8(pristine))
            for name, level, _, distorted, mos in distorted_versions(pristine, DISTORTION_TYPES, (seed, index), split):
                rows.append(dict(distortion=name, level=float(level), mos=mos, group=group))
                images.append(to_uint8(distorted))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, np.stack(images))
        meta.write_text(json.dumps(rows))
    return json.loads(meta.read_text()), np.load(cache, mmap_mode="r")


class TowerWithProbe(torch.nn.Module):
    """The base's vision tower and a `VisionProbe` on its merged tokens (with ``local_fidelity``
    also predicting every token's local fidelity, kept in ``token_fidelity`` by training forwards)."""

    def __init__(self, base: Path, local_fidelity: bool = False):
        super().__init__()
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(base, attn_implementation="sdpa")
        self.visual = model.model.visual.float()
        vision = model.config.vision_config
        self.patch_size, self.merge_size = vision.patch_size, vision.spatial_merge_size
        self.temporal_patch_size = vision.temporal_patch_size
        hidden = model.config.text_config.hidden_size
        self.probe = VisionProbe(self.visual, hidden, SCORE_MIDPOINT, False, local_fidelity)
        self.token_fidelity: torch.Tensor | None = None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 scores of float RGB ``[B, 3, H, W]`` pixels in [0, 1]."""
        # The Qwen-VL normalisation a QScorer applies (`QScorerConfig`'s defaults).
        normalised = normalize(pixels, QScorerConfig.image_mean, QScorerConfig.image_std)
        patches = patchify(normalised, self.patch_size, self.merge_size, self.temporal_patch_size)
        count, _, height, width = pixels.shape
        grid = torch.tensor([[1, height // self.patch_size, width // self.patch_size]] * count, device=pixels.device)
        self.visual(patches, grid_thw=grid)
        if self.training and self.probe.local_fidelity_layers is not None:
            self.token_fidelity = self.probe.token_fidelity()
        return self.probe.scores((grid.prod(-1) // self.merge_size**2).tolist())


def unit_pixels(images: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """float32 ``[B, 3, H, W]`` in [0, 1] on ``device`` of uint8 ``[B, H, W, 3]`` images."""
    return torch.from_numpy(np.array(images)).to(device).permute(0, 3, 1, 2).float() / 255


def augmented(
    pixels: torch.Tensor,
    rng: np.random.Generator,
    dihedral: bool,
    permute_channels: bool,
    maps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each image of ``[B, 3, H, W]`` mirrored left-right with probability 1/2, and with
    ``dihedral`` rotated by a random multiple of 90 degrees, with ``permute_channels`` with its
    RGB channels in a random order: transformations that leave the distortions' severity alone.
    ``maps`` (``[B, C, h, w]``, optional) are mirrored and turned with their images. Returns the
    images and the maps."""
    flips = rng.random(len(pixels)) < 0.5
    images, moved = [], []
    for index, (image, flip) in enumerate(zip(pixels, flips)):
        image_maps = None if maps is None else maps[index]
        if flip:
            image, image_maps = image.flip(-1), None if image_maps is None else image_maps.flip(-1)
        if dihedral:
            turns = int(rng.integers(4))
            image = torch.rot90(image, turns, dims=(-2, -1))
            image_maps = None if image_maps is None else torch.rot90(image_maps, turns, dims=(-2, -1))
        if permute_channels:
            image = image[torch.from_numpy(rng.permutation(3)).to(image.device)]
        images.append(image)
        moved.append(image_maps)
    return torch.stack(images), None if maps is None else torch.stack(moved)


@torch.no_grad()
def evaluate(model: TowerWithProbe, rows: list[dict], images: np.ndarray, batch: int = 64) -> dict:
    model.eval()
    device = next(model.parameters()).device
    scores = torch.cat(
        [model(unit_pixels(images[start : start + batch], device)) for start in range(0, len(images), batch)]
    )
    model.train()
    return summarise(rows, scores.double().cpu().numpy())


def make_optimizer(model: TowerWithProbe, kind: str, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW for everything, or `MuonWithAdamW` with Muon for the hidden weight matrices (the
    blocks', the merger's and the probe's first layer)."""
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    muon = muon_parameter_names(model)
    parameters = dict(model.named_parameters())
    groups = [
        {"params": [p for name, p in parameters.items() if name in muon], "muon": True},
        {"params": [p for name, p in parameters.items() if name not in muon]},
    ]
    return MuonWithAdamW(groups, lr=learning_rate)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train_rows = read_sample_rows(args.shard / "manifest.csv")
    train_images = decoded_images(train_rows, args.cache_dir / f"{args.shard.name}-shard.npy")
    size = train_images.shape[1]
    sets = {
        split: development_set(args.cache_dir / f"dev-{split}-{args.dev_crops}x{size}.npy", args.dev_crops, split, size)
        for split in ("train", "held_out")
        if args.dev_crops
    }
    if args.eval_dir:
        rows = read_sample_rows(args.eval_dir / "manifest.csv")
        sets["held_out_photos"] = (rows, decoded_images(rows, args.cache_dir / f"eval-{size}.npy"))

    model = TowerWithProbe(args.base, local_fidelity=bool(args.local_fidelity))
    if args.load:
        model.load_state_dict(torch.load(args.load, map_location="cpu"))
    model.to(args.device)
    optimizer = make_optimizer(model, args.optimizer, args.learning_rate)

    def schedule(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    mos = torch.tensor([row["mos"] for row in train_rows], dtype=torch.float32, device=args.device)
    groups_per_batch = args.batch_size // args.group_size
    group_count = len(train_rows) // args.group_size
    if groups_per_batch < 1 or group_count < groups_per_batch:
        raise SystemExit(f"{len(train_rows)} images make no batch of {args.batch_size} in groups of {args.group_size}")
    rng = np.random.default_rng(args.seed)
    order, position = rng.permutation(group_count), 0
    history, started = [], time.monotonic()

    def evaluate_all(step: int) -> dict:
        """Evaluate on every set, print and record the mean per-type SRCCs; the full results."""
        results = {name: evaluate(model, rows, images) for name, (rows, images) in sets.items()}
        entry = {"step": step, "seconds": round(time.monotonic() - started)}
        entry |= {name: round(result["mean_srcc"], 3) for name, result in results.items()}
        print(json.dumps(entry), flush=True)
        history.append(entry)
        return results

    results = evaluate_all(0) if args.steps == 0 else {}
    for step in range(1, args.steps + 1):
        if position + groups_per_batch > group_count:
            order, position = rng.permutation(group_count), 0
        groups = np.sort(order[position : position + groups_per_batch])
        position += groups_per_batch
        indices = (groups[:, None] * args.group_size + np.arange(args.group_size)).reshape(-1)
        pixels = unit_pixels(train_images[indices], args.device)
        maps = None
        if args.local_fidelity:  # a group's first image is its pristine one
            reference_index = torch.arange(len(pixels), device=pixels.device) // args.group_size
            region = model.patch_size * model.merge_size
            maps = local_fidelity_maps(pixels[:: args.group_size], pixels, region, reference_index)
        pixels, maps = augmented(pixels, rng, args.augment == "dihedral", args.permute_channels, maps)
        predicted = model(pixels)
        loss = score_mse_loss(predicted, mos[indices])
        if args.local_fidelity:
            target = 1 + 4 * maps.flatten(2).transpose(1, 2).reshape(-1, 2)  # tokens row-major per image
            loss = loss + args.local_fidelity * score_mse_loss(model.token_fidelity, target)
        if args.fidelity:
            loss = loss + args.fidelity * fidelity_loss(predicted, mos[indices])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            results = evaluate_all(step)
            if args.save:
                args.save.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), args.save)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "history": history}
    summary["per_type"] = {
        name: {kind: round(entry["srcc"], 3) for kind, entry in result["per_distortion"].items()}
        for name, result in results.items()
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
