"""The trainer for real: it learns a known quality function, runs under `accelerate launch` with two
processes, resumes a killed run to the same weights, never leaves a checkpoint that looks complete
half-written, skips and reports unreadable images, and the CLI trains and evaluates."""

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
from PIL import Image
from safetensors.torch import load_file
from scipy.stats import spearmanr

from qscorer_reward import QScorer
from qscorer_reward.cli import main
from qscorer_reward.testing import tiny_backbone_config, tiny_base_model, tiny_tokenizer
from qscorer_reward.training.config import AugmentSettings, DatasetConfig, LoraSettings, LossWeights, TrainingConfig
from qscorer_reward.training.datasets import read_manifest, write_manifest
from qscorer_reward.training.optimizers import MuonWithAdamW
from qscorer_reward.training.synthetic import make_synthetic_dataset
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
def test_the_default_models_setup_learns_it_with_the_tower_taught_by_the_probe(learnable_base, noise_data, tmp_path):
    # As qscorer-tiny trains: whole language model, no LoRA, the tower learning from the vision
    # probe alone, each part's gradients clipped on their own.
    config = learning_config(
        learnable_base,
        noise_data,
        tmp_path / "out",
        lora=None,
        train_language_model=True,
        loss=LossWeights(mse=1.0, ce=0.05, vision_probe=1.0, vision_probe_only=True),
    )
    report = ScoreTokenTrainer(config).train()
    assert report["held-out"]["srcc"] >= 0.9, report
    assert held_out_srcc(tmp_path / "out" / "final", noise_data[1]) >= 0.9
    probe_losses = [record["vision_probe"] for record in log_events(tmp_path / "out", "train")]
    assert probe_losses[-1] < 0.3 * probe_losses[0]


def test_probe_only_runs_clip_the_tower_and_the_score_path_separately(tiny_base, small_data, tmp_path, monkeypatch):
    # Clipped as one vector, the language model's large gradients would shrink the tower's too.
    config = resumable_config(
        tiny_base, small_data, tmp_path / "out", lora=None, train_vision_tower=True, train_language_model=True,
        loss=LossWeights(mse=1.0, ce=0.05, vision_probe=1.0, vision_probe_only=True), max_steps=1,
        gradient_accumulation_steps=1, gradient_checkpointing=False, save_steps=None, max_grad_norm=0.01,
    )  # fmt: skip
    gradients_at_step = {}
    adamw_step = torch.optim.AdamW.step

    def keep_gradients(optimizer, *args, **kwargs):
        for group in optimizer.param_groups:
            gradients_at_step.update({id(p): p.grad.clone() for p in group["params"] if p.grad is not None})
        return adamw_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", keep_gradients)
    trainer = ScoreTokenTrainer(config)
    trainer.train(resume=None)

    norms = {}
    for name, param in trainer.prepared.named_parameters():
        if id(param) in gradients_at_step:
            part = "probe" if ".visual." in f".{name}" or name.startswith("vision_probe.") else "score"
            norms[part] = norms.get(part, 0.0) + float(gradients_at_step[id(param)].pow(2).sum())
    assert norms["score"] ** 0.5 == pytest.approx(0.01, rel=1e-3)
    assert norms["probe"] ** 0.5 == pytest.approx(0.01, rel=1e-3)


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


# ------------------------------------------------------------------------ a vision-tower phase first


def tower_first_config(base, manifest, output_dir, **overrides) -> TrainingConfig:
    """A run of 6 steps whose first 3 train only the vision side (as qscorer-tiny's recipe)."""
    settings = dict(
        lora=None, train_vision_tower=True, train_language_model=True, vision_tower_steps=3, max_steps=6,
        loss=LossWeights(mse=1.0, ce=0.05, fidelity=0.1, vision_probe=1.0, vision_probe_only=True),
        gradient_checkpointing=False, logging_steps=1, warmup_ratio=0.0,
    )  # fmt: skip
    return resumable_config(base, manifest, output_dir, **(settings | overrides))


def is_vision_side(name: str) -> bool:
    return ".visual." in f".{name}" or name.startswith("vision_probe.")


def test_vision_tower_steps_train_the_vision_side_alone_then_everything(tiny_base, small_data, tmp_path, monkeypatch):
    steps = []  # per optimizer step: ids of the parameters with gradients, and each group's lr
    adamw_step = torch.optim.AdamW.step

    def record(optimizer, *args, **kwargs):
        with_gradients = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
        steps.append((with_gradients, {group["phase"]: group["lr"] for group in optimizer.param_groups}))
        return adamw_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    config = tower_first_config(tiny_base, small_data, tmp_path / "out", save_steps=None)
    trainer = ScoreTokenTrainer(config)
    language_model_calls = []
    trainer_build = trainer._build_model

    def build_and_watch():
        model = trainer_build()
        language_model = model.scorer.backbone.model.model.language_model
        language_model.register_forward_hook(lambda *args: language_model_calls.append(1))
        return model

    monkeypatch.setattr(trainer, "_build_model", build_and_watch)
    trainer.train(resume=None)

    names = {id(param): name for name, param in trainer.prepared.named_parameters()}
    vision = {i for i, name in names.items() if is_vision_side(name)}
    assert len(steps) == 6
    for with_gradients, rates in steps[:3]:
        assert with_gradients and with_gradients <= vision
        assert rates["vision"] > 0 and rates["language"] == 0
    for with_gradients, rates in steps[3:]:
        assert with_gradients & vision and with_gradients - vision
        assert rates["vision"] > 0 and rates["language"] > 0
    # The language side's schedule starts at the switch: a cosine over 3 steps without warm-up.
    assert steps[3][1]["language"] == pytest.approx(config.learning_rate)
    # The language model ran in the last 3 steps only, once per micro-batch (no evaluation here).
    assert len(language_model_calls) == 3 * config.gradient_accumulation_steps == 6
    records = log_events(tmp_path / "out", "train")
    assert [("mse" in r, "vision_probe" in r) for r in records] == [(False, True)] * 3 + [(True, True)] * 3
    assert {"lr_vision", "lr_language"} <= records[0].keys()


def test_muon_updates_the_hidden_matrices_and_adamw_the_rest(tiny_base, small_data, tmp_path, monkeypatch):
    steps = []  # per optimizer step: {parameter id: (Muon?, phase, lr)} of the parameters with gradients
    muon_step = MuonWithAdamW.step

    def record(optimizer, *args, **kwargs):
        steps.append({id(p): (group["muon"], group["phase"], group["lr"])
                      for group in optimizer.param_groups for p in group["params"] if p.grad is not None})  # fmt: skip
        return muon_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(MuonWithAdamW, "step", record)
    trainer = ScoreTokenTrainer(tower_first_config(tiny_base, small_data, tmp_path / "out", optimizer="muon",
                                                   save_steps=None))  # fmt: skip
    trainer.train(resume=None)

    parameters = dict(trainer.prepared.named_parameters())
    updates = {name: steps[-1][id(param)] for name, param in parameters.items() if id(param) in steps[-1]}
    by_muon = {name for name, (is_muon, _, _) in updates.items() if is_muon}
    assert by_muon == {name for name in updates if name.endswith(".weight") and parameters[name].ndim == 2
                       and min(parameters[name].shape) > 1 and not name.startswith("score_token_rows.")}  # fmt: skip
    assert any(".visual.blocks.0.attn.qkv." in name for name in by_muon)
    assert any(".language_model.layers.0.mlp." in name for name in by_muon)
    for name in ("scorer.head.mlp.4.weight", "score_token_rows.input_rows", "vision_probe.layers.2.weight"):
        assert name in updates and name not in by_muon
    assert any("patch_embed" in name for name in updates.keys() - by_muon)
    # The phases hold for both rules: the tower steps update the vision side alone.
    vision = {id(param) for name, param in parameters.items() if is_vision_side(name)}
    assert all(steps[i].keys() <= vision for i in range(3))
    assert {(is_muon, phase) for is_muon, phase, lr in steps[-1].values() if lr > 0} == {
        (True, "vision"),
        (False, "vision"),
        (True, "language"),
        (False, "language"),
    }


@pytest.mark.parametrize(
    ("vision_tower_steps", "resumed_at", "optimizer"),
    [(3, 2, "adamw"), (3, 4, "adamw"), (4, 4, "adamw"), (3, 4, "muon")],
    ids=["inside-the-tower-phase", "after-the-switch", "at-the-switch", "muon-after-the-switch"],
)
def test_a_phased_run_resumed_anywhere_ends_as_the_uninterrupted_one(
    tiny_base, small_data, tmp_path, vision_tower_steps, resumed_at, optimizer
):
    settings = dict(vision_tower_steps=vision_tower_steps, save_steps=2, optimizer=optimizer)
    uninterrupted = tower_first_config(tiny_base, small_data, tmp_path / "uninterrupted", save_total_limit=None,
                                       **settings)  # fmt: skip
    ScoreTokenTrainer(uninterrupted).train(resume=None)
    resumed = tower_first_config(tiny_base, small_data, tmp_path / "resumed", **settings)
    checkpoint = f"step-{resumed_at:08d}"
    shutil.copytree(
        tmp_path / "uninterrupted" / "checkpoints" / checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint
    )
    ScoreTokenTrainer(resumed).train()
    assert log_events(tmp_path / "resumed", "resumed")[0]["step"] == resumed_at
    # No LoRA: the tower and language model are trained whole (trained_modules).
    files = ("head.safetensors", "score_tokens.safetensors", "trained_modules.safetensors")
    assert_same_tensors(final_tensors(tmp_path / "resumed", files), final_tensors(tmp_path / "uninterrupted", files))


def test_resuming_with_another_vision_tower_phase_is_refused(tiny_base, small_data, tmp_path):
    ScoreTokenTrainer(tower_first_config(tiny_base, small_data, tmp_path / "out", max_steps=2, vision_tower_steps=1,
                                         save_steps=2)).train(resume=None)  # fmt: skip
    longer_phase = tower_first_config(tiny_base, small_data, tmp_path / "out", max_steps=4, vision_tower_steps=3)
    with pytest.raises(ValueError, match="vision_tower_steps: 1 then, 3 now"):
        ScoreTokenTrainer(longer_phase).train()
