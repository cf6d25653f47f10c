"""The trainer for real: it learns a known quality function, runs under `accelerate launch` with two
processes, resumes a killed run to the same weights, never leaves a checkpoint that looks complete
half-written, skips and reports unreadable images, trains parameter groups on their own schedules,
and the CLI trains and evaluates."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from noisy_crops import make_synthetic_dataset
from PIL import Image
from safetensors.torch import load_file
from scipy.stats import spearmanr

from qscorer_reward import QScorer
from qscorer_reward.cli import main
from qscorer_reward.testing import tiny_backbone_config, tiny_base_model, tiny_tokenizer
from qscorer_reward.training.config import (
    AugmentSettings,
    DatasetConfig,
    LoraSettings,
    LossWeights,
    ParameterGroup,
    TrainingConfig,
)
from qscorer_reward.training.data import read_manifest, write_manifest
from qscorer_reward.training.trainer import ScoreTokenTrainer

TRAIN_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]
HELD_OUT_PHOTOS = ["coins", "moon", "gravel", "clock"]  # other photos: held-out content, not just held-out crops
CHECKPOINT_FILES = ("head.safetensors", "score_tokens.safetensors", "adapter_model.safetensors")


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate_state():
    # Tiny models run fastest single-threaded, and a second thread on a loaded 2-core machine
    # slows them down many times over. accelerate keeps process-wide state (e.g. the mixed
    # precision) that each run here sets anew.
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def learnable_base(tmp_path_factory):
    """A tiny Qwen2.5-VL with 4-pixel vision patches, saved as a base model directory.

    A random tiny vision tower learns pixel-level statistics such as noise energy in a few hundred
    steps with small patches; with the real 14-pixel patches it needs thousands (a real backbone
    arrives pretrained, with such features already there).
    """
    from transformers import AutoModelForImageTextToText

    tokenizer = tiny_tokenizer()
    config = tiny_backbone_config("qwen2_5_vl", vocab_size=len(tokenizer) + 2)
    config.vision_config.patch_size = 4
    config.vision_config.window_size = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    directory = tmp_path_factory.mktemp("base") / "tiny-patch4"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def noise_data(tmp_path_factory):
    """Training crops of six photos and held-out crops of four others; MOS = 5 - 4 x noise level."""
    root = tmp_path_factory.mktemp("noise")
    train = make_synthetic_dataset(root / "train", TRAIN_PHOTOS, num_images=800, image_size=32, seed=0)
    held_out = make_synthetic_dataset(root / "held_out", HELD_OUT_PHOTOS, num_images=64, image_size=32, seed=1)
    return train, held_out


def learning_config(base, data, output_dir, **overrides) -> TrainingConfig:
    """The convergence run: LoRA on the language model, vision tower, merger, score rows and head."""
    train, held_out = data
    settings = dict(
        base_model=str(base),
        output_dir=str(output_dir),
        train_datasets=[DatasetConfig(name="noise", path=str(train))],
        eval_datasets=[DatasetConfig(name="held-out", path=str(held_out))],
        num_score_tokens=1,
        min_pixels=16 * 16,
        max_pixels=32 * 32,
        dtype="float32",
        mixed_precision="no",
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        train_vision_tower=True,
        train_merger=True,
        max_steps=300,
        per_device_batch_size=16,
        learning_rate=1e-3,
        warmup_ratio=0.05,
        gradient_checkpointing=False,
        num_workers=0,
        eval_steps=10_000,  # only the final evaluation
        save_steps=None,
        logging_steps=50,
    )
    return TrainingConfig(**(settings | overrides))


def held_out_srcc(checkpoint: Path, manifest: Path) -> float:
    records = read_manifest(manifest)
    scores = QScorer.from_pretrained(checkpoint)([record.path for record in records])
    return spearmanr(scores.numpy(), [record.mos for record in records]).statistic


def log_events(output_dir: Path, event: str) -> list[dict]:
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == event]


@pytest.fixture(scope="module")
def trained_run(learnable_base, noise_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu_started = time.process_time()
    report = ScoreTokenTrainer(learning_config(learnable_base, noise_data, output_dir)).train()
    cpu_seconds = time.process_time() - cpu_started
    torch.set_num_threads(threads)
    print(f"\nconvergence run: {cpu_seconds:.1f} s of CPU for 300 steps", file=sys.stderr)
    return output_dir, report


# ---------------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_tiny_scorer_learns_a_known_quality_function(trained_run, noise_data):
    output_dir, report = trained_run
    assert report["held-out"]["srcc"] >= 0.9, report
    assert report["held-out"]["n"] == 64
    losses = [record["mse"] for record in log_events(output_dir, "train")]
    assert losses[-1] < 0.3 * losses[0]
    # The checkpoint it wrote is what learned: loaded on its own, it ranks the held-out images too.
    assert held_out_srcc(output_dir / "final", noise_data[1]) >= 0.9
    assert json.loads((output_dir / "eval_report.json").read_text())["held-out"]["srcc"] == pytest.approx(
        report["held-out"]["srcc"]
    )
    assert (output_dir / "best" / "qscorer_config.json").is_file()


@pytest.mark.slow
def test_the_same_run_under_accelerate_launch_with_two_processes(learnable_base, noise_data, tmp_path):
    # Two processes with 16 images each: half the steps see the same number of images.
    config = learning_config(learnable_base, noise_data, tmp_path / "out", max_steps=150, save_steps=150)
    config.save(tmp_path / "config.yaml")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    command = [*launcher, "-m", "qscorer_reward.cli", "train", "--config", str(tmp_path / "config.yaml")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000150"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert held_out_srcc(tmp_path / "out" / "final", noise_data[1]) >= 0.9


# ---------------------------------------------------------------------------------------- resuming


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return make_synthetic_dataset(root, TRAIN_PHOTOS, num_images=40, image_size=56, seed=2)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    model, tokenizer = tiny_base_model("qwen2_5_vl", seed=5)
    directory = tmp_path_factory.mktemp("base") / "tiny"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def resumable_config(base, manifest, output_dir, **overrides) -> TrainingConfig:
    """Everything that could make a resumed run differ is on: LoRA dropout (the global generator),
    augmentation, gradient accumulation, several epochs, AdamW state, the cosine schedule."""
    settings = dict(
        base_model=str(base),
        output_dir=str(output_dir),
        train_datasets=[DatasetConfig(name="small", path=str(manifest))],
        num_score_tokens=2,
        max_pixels=56 * 56,
        dtype="float32",
        mixed_precision="no",
        lora=LoraSettings(r=4, alpha=8, dropout=0.1),
        train_merger=True,
        augment=AugmentSettings(hflip=True, min_crop_side=0.8),
        loss=LossWeights(mse=1.0, ce=0.05, plcc=0.1, fidelity=0.1, ranking=0.1),
        max_steps=40,
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        warmup_ratio=0.1,
        gradient_checkpointing=True,
        num_workers=0,
        save_steps=4,
        save_total_limit=3,
        logging_steps=4,
    )
    return TrainingConfig(**(settings | overrides))


def final_tensors(
    output_dir: Path, files=(*CHECKPOINT_FILES, "trained_modules.safetensors")
) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in files:
        tensors |= {f"{name}:{k}": v for k, v in load_file(output_dir / "final" / name).items()}
    return tensors


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(tiny_base, small_data, tmp_path):
    uninterrupted = resumable_config(tiny_base, small_data, tmp_path / "uninterrupted")
    ScoreTokenTrainer(uninterrupted).train(resume=None)

    interrupted = resumable_config(tiny_base, small_data, tmp_path / "interrupted")
    interrupted.save(tmp_path / "config.yaml")
    process = subprocess.Popen(
        [sys.executable, "-m", "qscorer_reward.cli", "train", "--config", str(tmp_path / "config.yaml")],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "step-00000008" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "interrupted" / "final").exists(), "the run finished before it could be killed"

    ScoreTokenTrainer(interrupted).train()  # resume="auto": from the latest complete checkpoint
    resumed_from = log_events(tmp_path / "interrupted", "resumed")[0]["step"]
    assert 8 <= resumed_from < 40
    expected, got = final_tensors(tmp_path / "uninterrupted"), final_tensors(tmp_path / "interrupted")
    assert_same_tensors(got, expected)
    # And the weights did move: the comparison is not between two untrained models.
    start = resumable_config(tiny_base, small_data, tmp_path / "short", max_steps=1, save_steps=None)
    ScoreTokenTrainer(start).train()
    assert not torch.allclose(final_tensors(tmp_path / "short")["head.safetensors:mlp.0.weight"],
                              expected["head.safetensors:mlp.0.weight"])  # fmt: skip


def test_an_interrupted_save_never_looks_complete(tiny_base, small_data, tmp_path, monkeypatch):
    from accelerate import Accelerator

    config = resumable_config(tiny_base, small_data, tmp_path / "out", max_steps=4, save_steps=2)
    original = Accelerator.save_state
    calls = []

    def save_state_then_fail(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        result = original(self, output_dir, **kwargs)
        if len(calls) == 2:  # the second save dies after writing its files, before completion
            raise OSError("disk full")
        return result

    monkeypatch.setattr(Accelerator, "save_state", save_state_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ScoreTokenTrainer(config).train()
    monkeypatch.undo()
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".step-00000004.partial", "step-00000002"]
    assert not (checkpoints / ".step-00000004.partial" / "trainer_state.json").exists()

    ScoreTokenTrainer(config).train()
    assert log_events(tmp_path / "out", "resumed")[0]["step"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
    assert QScorer.from_pretrained(tmp_path / "out" / "final") is not None


def test_resuming_with_other_batch_settings_is_refused(tiny_base, small_data, tmp_path):
    ScoreTokenTrainer(resumable_config(tiny_base, small_data, tmp_path / "out", max_steps=2, save_steps=2)).train()
    changed = resumable_config(tiny_base, small_data, tmp_path / "out", max_steps=4, per_device_batch_size=2)
    with pytest.raises(ValueError, match=r"settings changed \(per_device_batch_size: 4 then, 2 now\)"):
        ScoreTokenTrainer(changed).train()


# ---------------------------------------------------------------------------------------- data problems


def test_unreadable_images_are_reported_skipped_and_counted(tiny_base, small_data, tmp_path, capsys):
    records = read_manifest(small_data)
    truncated = tmp_path / "truncated.png"
    data = records[0].path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a valid header: found only when decoded
    missing = tmp_path / "missing.png"
    bad = [records[0].__class__(truncated, 3.0), records[0].__class__(missing, 2.0)]
    manifest = write_manifest(records[:10] + bad, tmp_path / "with_bad.csv")
    other = write_manifest(records[10:20], tmp_path / "other.csv")
    config = resumable_config(
        tiny_base,
        small_data,
        tmp_path / "out",
        train_datasets=[
            DatasetConfig(name="with-bad", path=str(manifest), weight=3.0),
            DatasetConfig(name="other", path=str(other), weight=1.0),
        ],
        samples_per_epoch=12,
        max_steps=6,
        save_steps=None,
        logging_steps=2,
    )
    ScoreTokenTrainer(config).train()
    skipped = {Path(e["path"]).name: e["reason"] for e in log_events(tmp_path / "out", "skipped_image")}
    assert skipped["missing.png"] == "no such file"  # found by the start-up check
    assert "cannot read image" in skipped["truncated.png"]  # found when decoded, mid-run
    assert log_events(tmp_path / "out", "train")[-1]["skipped_images"] == 2
    err = capsys.readouterr().err
    assert "1 of 12 images missing or unreadable, skipped" in err and "truncated.png" in err
    assert (tmp_path / "out" / "final" / "head.safetensors").is_file()


def test_a_manifest_with_wrong_columns_fails_at_start(tiny_base, tmp_path, capsys):
    manifest = tmp_path / "scores.csv"
    manifest.write_text("filename,score\na.png,3.0\n")
    config = resumable_config(tiny_base, manifest, tmp_path / "out")
    config.save(tmp_path / "config.yaml")
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 2  # one line, no traceback
    assert "scores.csv: manifest is missing the required column(s) ['image', 'mos']" in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------- CLI eval


@pytest.mark.slow
def test_cli_eval_on_a_manifest_and_an_official_layout(trained_run, noise_data, tmp_path, capsys):
    output_dir, report = trained_run
    output = tmp_path / "report.json"
    status = main(["eval", "--checkpoint", str(output_dir / "final"), "--manifest", str(noise_data[1]),
                   "--name", "held-out", "--output", str(output), "--no-progress"])  # fmt: skip
    assert status == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["dataset", "srcc", "plcc", "krcc", "rmse", "rmse_raw", "n"]
    assert table[1].split()[0] == "held-out" and table[1].split()[-1] == "64"
    written = json.loads(output.read_text())
    # The CLI scores with the merged checkpoint; the trainer evaluated its unmerged model.
    assert written["datasets"]["held-out"]["srcc"] == pytest.approx(report["held-out"]["srcc"], abs=0.01)
    assert written["skipped_images"] == []

    # The same images laid out as a KADID-10k release (dmos.csv + images/), with one file missing.
    root = tmp_path / "kadid"
    (root / "images").mkdir(parents=True)
    rows = ["dist_img,ref_img,dmos,var"]
    for i, record in enumerate(read_manifest(noise_data[1])):
        Image.open(record.path).save(root / "images" / f"I{i:02d}_01_01.png")
        rows.append(f"I{i:02d}_01_01.png,I{i:02d}.png,{record.mos},0.1")
    rows.append("I99_01_01.png,I99.png,3.0,0.1")
    (root / "dmos.csv").write_text("\n".join(rows) + "\n")
    status = main(["eval", "--checkpoint", str(output_dir / "final"), "--dataset", "kadid10k", "--root", str(root),
                   "--output", str(output), "--no-progress"])  # fmt: skip
    assert status == 0
    written = json.loads(output.read_text())
    assert written["datasets"]["kadid10k"]["n"] == 64
    assert written["datasets"]["kadid10k"]["srcc"] == pytest.approx(report["held-out"]["srcc"], abs=0.01)
    assert [Path(item["path"]).name for item in written["skipped_images"]] == ["I99_01_01.png"]
    assert np.isfinite(written["datasets"]["kadid10k"]["plcc"])


def test_cli_eval_requires_a_root_for_an_official_dataset(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", "koniq10k"])
    assert "--dataset needs --root" in capsys.readouterr().err


# ------------------------------------------------------------------------ parameter groups


def staged_config(base, manifest, output_dir, start_step=3, **overrides) -> TrainingConfig:
    """A run of 6 steps whose first ``start_step`` train only the head and the score-token rows
    (linear probing), after which the LoRA adapter and the merger join (fine-tuning)."""
    groups = [
        ParameterGroup("head", ["scorer.head.*", "score_token_rows.*"]),
        ParameterGroup("rest", start_step=start_step),
    ]
    settings = dict(
        parameter_groups=groups, max_steps=6, logging_steps=1, warmup_ratio=0.0, gradient_checkpointing=False
    )
    return resumable_config(base, manifest, output_dir, **(settings | overrides))


def is_head(name: str) -> bool:
    return name.startswith(("scorer.head.", "score_token_rows."))


def test_a_later_group_is_frozen_until_it_starts_then_follows_its_own_schedule_and_clipping(
    tiny_base, small_data, tmp_path, monkeypatch
):
    steps = []  # per optimizer step: the gradients it applies, each group's lr, the parameters with state
    adamw_step = torch.optim.AdamW.step

    def record(optimizer, *args, **kwargs):
        gradients = {id(p): p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
        rates = {group["group"]: group["lr"] for group in optimizer.param_groups}
        steps.append((gradients, rates, {id(p) for p in optimizer.state}))
        return adamw_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    config = staged_config(tiny_base, small_data, tmp_path / "out", save_steps=None, max_grad_norm=0.01,
                           eval_datasets=[DatasetConfig(name="small", path=str(small_data))], eval_steps=1)  # fmt: skip
    trainer = ScoreTokenTrainer(config)
    trainer.train(resume=None)

    names = {id(param): name for name, param in trainer.prepared.named_parameters()}
    head = {i for i, name in names.items() if is_head(name)}
    assert len(steps) == 6
    for gradients, rates, with_state in steps[:3]:
        # The LoRA adapter's gradients are dropped: no update and no optimizer state before it starts.
        assert gradients and gradients.keys() <= head and with_state <= head
        assert rates["head"] > 0 and rates["rest"] == 0
    for gradients, rates, _ in steps[3:]:
        assert gradients.keys() & head and gradients.keys() - head
        assert rates["head"] > 0 and rates["rest"] > 0
        # Each group is clipped on its own (both start far above 0.01).
        for part in (head, gradients.keys() - head):
            norm = sum(float(gradients[i].pow(2).sum()) for i in part) ** 0.5
            assert norm == pytest.approx(0.01, rel=1e-3)
    # The later group's schedule starts when it does: a cosine over 3 steps without warm-up.
    assert steps[3][1]["rest"] == pytest.approx(config.learning_rate)
    assert {"lr_head", "lr_rest"} <= log_events(tmp_path / "out", "train")[0].keys()
    # Evaluation waits until every group has started.
    assert [event["step"] for event in log_events(tmp_path / "out", "eval")] == [4, 5, 6]


def test_trained_parameters_outside_every_group_are_refused(tiny_base, small_data, tmp_path):
    groups = [ParameterGroup("head", ["scorer.head.*"])]
    with pytest.raises(ValueError, match=r"trained parameters belong to no parameter group \(e.g. \['scorer.backbone"):
        ScoreTokenTrainer(staged_config(tiny_base, small_data, tmp_path / "out", parameter_groups=groups)).train()


@pytest.mark.parametrize(
    ("start_step", "resumed_at"),
    [(3, 2), (3, 4), (4, 4)],
    ids=["before-the-start", "after-the-start", "at-the-start"],
)
def test_a_staged_run_resumed_anywhere_ends_as_the_uninterrupted_one(
    tiny_base, small_data, tmp_path, start_step, resumed_at
):
    settings = dict(start_step=start_step, save_steps=2)
    uninterrupted = staged_config(tiny_base, small_data, tmp_path / "uninterrupted", save_total_limit=None, **settings)
    ScoreTokenTrainer(uninterrupted).train(resume=None)
    resumed = staged_config(tiny_base, small_data, tmp_path / "resumed", **settings)
    checkpoint = f"step-{resumed_at:08d}"
    shutil.copytree(
        tmp_path / "uninterrupted" / "checkpoints" / checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint
    )
    ScoreTokenTrainer(resumed).train()
    assert log_events(tmp_path / "resumed", "resumed")[0]["step"] == resumed_at
    assert_same_tensors(final_tensors(tmp_path / "resumed"), final_tensors(tmp_path / "uninterrupted"))


def test_resuming_with_other_parameter_groups_is_refused(tiny_base, small_data, tmp_path):
    ScoreTokenTrainer(staged_config(tiny_base, small_data, tmp_path / "out", start_step=1, max_steps=2,
                                    save_steps=2)).train(resume=None)  # fmt: skip
    later_start = staged_config(tiny_base, small_data, tmp_path / "out", start_step=3, max_steps=4)
    with pytest.raises(
        ValueError, match=r"parameter_groups: \[.*'start_step': 1\}\] then, \[.*'start_step': 3\}\] now"
    ):
        ScoreTokenTrainer(later_start).train()
