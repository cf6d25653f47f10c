"""Reproduce qscorer-tiny, the bundled default model, with one command (from the repository root)::

    OMP_NUM_THREADS=2 python -m recipes.qscorer_tiny.reproduce [--config FILE] [--set KEY=VALUE ...] [--check]

Writes the random base (`make_tiny_base`) and the synthetic shards (`synthetic_shard`) unless they
are there already, then trains the recipe's `training` config with `vision_probe.VisionTowerFirst`,
resuming an interrupted run. The merged checkpoint lands in ``<output_dir>/final-merged``;
``--check`` compares it byte for byte with ``qscorer_reward/default_model`` (exit status 1 if they
differ). About 47 minutes on a 2-core CPU (README.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qscorer_reward.checkpoint import BUNDLED_DEFAULT
from qscorer_reward.config_files import load_config, parse_overrides
from qscorer_reward.training.config import TrainingConfig
from qscorer_reward.training.trainer import ScoreTokenTrainer

from .make_tiny_base import write_tiny_base
from .synthetic_shard import SyntheticSettings, ensure_synthetic_shard
from .vision_probe import VisionTowerFirst

RECIPE = Path(__file__).with_name("qscorer_tiny.yaml")


@dataclass
class ShardSettings:
    """The synthetic shard of the training config's dataset named ``dataset``, written into the
    folder of that dataset's manifest."""

    dataset: str
    synthetic: SyntheticSettings


@dataclass
class TinyRecipe:
    """``qscorer_tiny.yaml``: the base's seed, the shards, the probe's weight and the training run.
    The vision tower trains alone until the last of ``training.parameter_groups`` starts."""

    training: TrainingConfig
    shards: list[ShardSettings] = field(default_factory=list)
    base_seed: int = 0
    vision_probe_weight: float = 1.0

    def __post_init__(self) -> None:
        names = {spec.name for spec in (*self.training.train_datasets, *self.training.eval_datasets)}
        for shard in self.shards:
            if shard.dataset not in names:
                raise ValueError(f"shard for dataset {shard.dataset!r}, which the training config does not list")
        for spec in self.training.train_datasets:
            shard = next((s for s in self.shards if s.dataset == spec.name), None)
            if shard is not None and shard.synthetic.group_size != spec.group_size:
                raise ValueError(
                    f"dataset {spec.name!r}: group_size {spec.group_size}, its shard's {shard.synthetic.group_size}"
                )

    @property
    def vision_tower_steps(self) -> int:
        return max((group.start_step for group in self.training.parameter_groups), default=0)


def prepare(recipe: TinyRecipe) -> None:
    """Write the base and the shards the training config reads, unless they exist already."""
    base = Path(recipe.training.base_model)
    if not (base / "config.json").is_file():
        write_tiny_base(base, recipe.base_seed)
    specs = {spec.name: spec for spec in (*recipe.training.train_datasets, *recipe.training.eval_datasets)}
    for shard in recipe.shards:
        manifest = ensure_synthetic_shard(Path(specs[shard.dataset].path).parent, shard.synthetic)
        if manifest != Path(specs[shard.dataset].path):
            raise ValueError(f"dataset {shard.dataset!r} must read its shard's manifest {manifest}")


def train(recipe: TinyRecipe) -> dict:
    """`prepare`, then train (resuming from the run's checkpoints); returns the evaluation report."""
    prepare(recipe)
    callback = VisionTowerFirst(recipe.vision_tower_steps, recipe.vision_probe_weight)
    return ScoreTokenTrainer(recipe.training, callbacks=[callback]).train()


def differences(checkpoint: Path, reference: Path = BUNDLED_DEFAULT) -> list[str]:
    """The files of ``reference`` that ``checkpoint`` lacks or holds with other bytes, and its extra files."""
    ours, theirs = ({p.name for p in folder.iterdir() if p.is_file()} for folder in (checkpoint, reference))
    differ = [
        name for name in sorted(ours & theirs) if (checkpoint / name).read_bytes() != (reference / name).read_bytes()
    ]
    return [
        *differ,
        *(f"{name} (missing)" for name in sorted(theirs - ours)),
        *(f"{name} (extra)" for name in sorted(ours - theirs)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=RECIPE, help="the recipe (default: qscorer_tiny.yaml)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override settings, e.g. training.max_steps=10"
    )
    parser.add_argument("--check", action="store_true", help="compare final-merged with the bundled checkpoint")
    args = parser.parse_args(argv)
    recipe = load_config(TinyRecipe, args.config, parse_overrides(args.set))
    report = train(recipe)
    print(f"evaluation: {report}", file=sys.stderr)
    if not args.check:
        return 0
    merged = Path(recipe.training.output_dir) / "final-merged"
    differ = differences(merged)
    print(f"{merged} is byte-identical to {BUNDLED_DEFAULT}" if not differ else f"{merged} differs: {differ}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
