"""Training the paper's model: score-token fine-tuning of the native mPLUG-Owl2 backbone from its
released base, with the released recipe (`training/configs/mplug_owl2_koniq.yaml`), on a tiny
random release written by the package's own code (`qscorer_reward.testing.official`).

The trainer runs for real: LoRA on exactly the released targets, the vision tower, abstractor,
lm_head and head trained whole, the teacher-forced answer ``▁ <scoreN> . </s>`` with the head read
at ``▁``; the whole-weights export loads and scores as the model did in memory, with the paper's
two-pass evaluation landing on the position training read."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from qscorer_reward import QScorer
from qscorer_reward.backbones.mplug_owl2 import MPLUG_OWL2_PROMPT_TEMPLATE
from qscorer_reward.official_checkpoint import missing_official_packages
from qscorer_reward.preprocessing import to_unit_pixels
from qscorer_reward.testing.official import write_tiny_release
from qscorer_reward.training.callbacks import TrainerCallback
from qscorer_reward.training.config import TrainingConfig
from qscorer_reward.training.losses import score_token_ce_loss
from qscorer_reward.training.model import (
    QScorerForTraining,
    TrainableParts,
    answer_token_count,
    language_model_modules,
    score_levels,
)
from qscorer_reward.training.trainer import ScoreTokenTrainer

RECIPE = Path(__file__).resolve().parents[1] / "training" / "configs" / "mplug_owl2_koniq.yaml"
FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "qscorer_official_tiny"
RELEASED_TARGETS = ["q_proj", "v_proj.multiway.1"]
NUM_IMAGES = 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # accelerate keeps process-wide state (e.g. the mixed precision) that each run here sets anew.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny base stored as ``MAGAer13/mplug-owl2-llama2-7b`` is (pickle shards, index, config)."""
    return write_tiny_release(tmp_path_factory.mktemp("release"), seed=0)[1]


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory) -> Path:
    """Flat grey images whose MOS is their brightness on 1..5: a target the tiny model can learn."""
    root = tmp_path_factory.mktemp("toy")
    rows = ["image,mos"]
    for index in range(NUM_IMAGES):
        level = index / (NUM_IMAGES - 1)
        Image.fromarray(np.full((24, 32, 3), round(255 * level), np.uint8)).save(root / f"{index:02d}.png")
        rows.append(f"{index:02d}.png,{1 + 4 * level:.4f}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def recipe(base_dir: Path, manifest: Path, output_dir: Path, **overrides) -> TrainingConfig:
    """The released recipe, pointed at the tiny base and toy data, sized for a CPU test."""
    settings = {
        "base_model": str(base_dir),
        "output_dir": str(output_dir),
        "train_datasets": [{"name": "toy", "path": str(manifest)}],
        "eval_datasets": [],
        "best_dataset": None,
        "head_hidden_sizes": None,  # the released shape h -> h/2 -> h/4 on the tiny width
        "dtype": "float32",
        "mixed_precision": "no",
        "lora.r": 4,
        "lora.alpha": 8,
        "lora.dropout": 0.0,
        "max_steps": 100,
        "per_device_batch_size": 4,
        "learning_rate": 5e-3,
        "head_learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "loss.mse": 1.0,
        "loss.ce": 1.0,
        "num_workers": 0,
        "save_steps": None,
        "logging_steps": 10,
        "report_to": [],
    }
    return TrainingConfig.from_file(RECIPE, settings | overrides)


class Snapshot(TrainerCallback):
    """Keeps a copy of every parameter as the trainer built it, before the first step."""

    def on_model_built(self, model):
        self.initial = {name: param.detach().clone() for name, param in model.named_parameters()}


def image_paths(manifest: Path) -> list[str]:
    return [str(manifest.parent / f"{index:02d}.png") for index in range(NUM_IMAGES)]


@pytest.fixture(scope="module")
def trained(base_dir, toy_manifest, tmp_path_factory):
    """One run of the recipe through the real trainer: ``(trainer, snapshot, output_dir)``."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    output_dir = tmp_path_factory.mktemp("run") / "out"
    snapshot = Snapshot()
    trainer = ScoreTokenTrainer(recipe(base_dir, toy_manifest, output_dir), callbacks=[snapshot])
    trainer.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    return trainer, snapshot, output_dir


# ---------------------------------------------------------------------------------------- the recipe


def test_the_recipe_carries_the_released_hyperparameters():
    config = TrainingConfig.from_file(RECIPE)
    assert config.base_model == "MAGAer13/mplug-owl2-llama2-7b"
    assert config.prompt_template == MPLUG_OWL2_PROMPT_TEMPLATE
    assert MPLUG_OWL2_PROMPT_TEMPLATE.endswith(config.answer_text) and not config.answer_text.startswith(" ")
    assert (config.num_score_tokens, config.head_hidden_sizes) == (5, [2048, 1024])
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (128, 256, 0.05)
    assert config.lora.target_modules == RELEASED_TARGETS
    assert config.train_vision_tower and config.train_merger and config.train_lm_head
    assert not config.train_language_model
    assert (config.loss.mse, config.loss.ce) == (0.05, 0.05)
    assert (config.loss.plcc, config.loss.fidelity, config.loss.ranking) == (0.0, 0.0, 0.0)
    assert (config.num_epochs, config.per_device_batch_size, config.gradient_accumulation_steps) == (3, 16, 1)
    assert (config.learning_rate, config.head_learning_rate, config.weight_decay) == (2e-5, None, 0.0)
    assert (config.lr_scheduler, config.warmup_ratio, config.max_grad_norm) == ("cosine", 0.03, 1.0)
    assert (config.dtype, config.mixed_precision, config.gradient_checkpointing) == ("bfloat16", "bf16", True)


# ---------------------------------------------------------------------------------------- the start


def test_the_released_base_becomes_an_untrained_scorer_with_score_tokens_and_a_fresh_head(base_dir):
    base = {}
    for shard in sorted(base_dir.glob("pytorch_model-*.bin")):
        base |= torch.load(shard, weights_only=True)
    torch.manual_seed(0)
    scorer = QScorer.from_base_model(base_dir, num_score_tokens=5)
    state = scorer.backbone.model.state_dict()
    vocabulary = base["model.embed_tokens.weight"].shape[0]
    assert scorer.config.score_token_ids == list(range(vocabulary, vocabulary + 5))
    assert scorer.tokenizer.convert_ids_to_tokens(scorer.config.score_token_ids) == [f"<score{i}>" for i in range(1, 6)]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(state[name][:vocabulary], base[name])
        mean = base[name].mean(0)
        assert all(torch.allclose(row, mean, atol=1e-6) for row in state[name][vocabulary:])
    assert all(
        torch.equal(state[name], tensor)
        for name, tensor in base.items()
        if "embed_tokens" not in name and "lm_head" not in name
    )
    head = scorer.head
    assert head.hidden_sizes == [16, 8] and (head.bound, head.centered) == ("none", False)
    assert all(not layer.bias.any() for layer in head.mlp if isinstance(layer, torch.nn.Linear))
    config = scorer.config
    assert (config.backbone_family, config.base_model, config.score_range) == ("mplug_owl2", None, (0.0, 5.0))
    assert config.prompt_template == MPLUG_OWL2_PROMPT_TEMPLATE


@pytest.mark.skipif(
    not FIXTURE.is_dir(), reason="needs ../shared/fixtures/qscorer_official_tiny (the reference's base)"
)
@pytest.mark.skipif(bool(missing_official_packages()), reason="its tokenizer.model needs: pip install -e '.[official]'")
def test_on_the_references_base_the_answer_is_tokenized_as_the_reference_tokenizes_it():
    # The fixture's notes: "... the image is <score3>." is `338 ▁is, 29871 ▁, 32002 <score3>, 29889 .`
    torch.manual_seed(0)
    scorer = QScorer.from_base_model(FIXTURE / "base", num_score_tokens=5)
    assert scorer.config.score_token_ids == [32000, 32001, 32002, 32003, 32004]
    assert answer_token_count(scorer, "The quality of the image is") == 6
    inputs = scorer.backbone.prepare_training(torch.rand(1, 3, 40, 50), score_levels(torch.tensor([3.0]), 5))
    assert inputs.input_ids[0, -5:].tolist() == [338, 29871, 32002, 29889, 2]


# ---------------------------------------------------------------------------------------- the model


def training_model(base_dir, seed=0) -> QScorerForTraining:
    from peft import LoraConfig

    torch.manual_seed(seed)
    scorer = QScorer.from_base_model(base_dir, num_score_tokens=5)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=language_model_modules(scorer.backbone, RELEASED_TARGETS))
    parts = TrainableParts(lora=lora, vision_tower=True, merger=True, lm_head=True)
    answer_length = answer_token_count(scorer, "The quality of the image is")
    return QScorerForTraining(scorer, parts, answer_length, gradient_checkpointing=False)


def test_the_training_sequence_is_the_papers_answer_with_the_head_read_before_the_score_token(base_dir):
    model = training_model(base_dir).eval()
    scorer, backbone = model.scorer, model.scorer.backbone
    mos = torch.tensor([1.0, 2.9, 4.25, 5.0])
    assert score_levels(mos, 5).tolist() == [0, 2, 4, 4]
    pixels = torch.rand(4, 3, 30, 40, generator=torch.Generator().manual_seed(1))
    inputs = backbone.prepare_training(pixels, score_levels(mos, 5))
    prompt = backbone.prepare(pixels).input_ids
    length = prompt.shape[1]
    tokens = scorer.tokenizer.convert_tokens_to_ids(["▁", "<score1>", "<score3>", "<score5>", "."])
    space, score1, score3, score5, period = tokens
    eos = scorer.tokenizer.eos_token_id
    assert torch.equal(inputs.input_ids[:, :length], prompt)
    assert inputs.input_ids[:, length:].tolist() == [
        [space, score, period, eos] for score in (score1, score3, score5, score5)
    ]
    assert inputs.score_positions.tolist() == [length] * 4  # the "▁" position predicts the score token
    assert torch.equal(
        inputs.input_ids.gather(1, inputs.score_positions[:, None] + 1)[:, 0],
        torch.tensor([score1, score3, score5, score5]),
    )
    with pytest.raises(ValueError, match="score_levels"):
        backbone.prepare_training(pixels, None)

    # The training forward against a plain full forward of the causal LM: the head at "▁", and
    # the cross-entropy over "The quality of the image is ▁ <scoreN> . </s>" from lm_head itself.
    with torch.no_grad():
        outputs = model(pixels, mos=mos)
        hidden, _ = backbone.one_pass(inputs)
        logits = backbone.model.lm_head(hidden)
    count = model.answer_length
    assert scorer.tokenizer.decode(inputs.input_ids[0, length - count : length]) == "The quality of the image is"
    predicting = torch.arange(length - count - 1, length + 3)
    expected_ce = score_token_ce_loss(logits[:, predicting], inputs.input_ids[:, predicting + 1])
    assert outputs["ce_loss"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    torch.testing.assert_close(outputs["raw_scores"], scorer.head(hidden[:, length]))
    # Without the MOS and the cross-entropy it scores as inference does: the paper's two passes.
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, compute_ce=False)["scores"], scorer(pixels))


def test_exactly_the_released_parts_train_and_get_gradients(base_dir):
    model = training_model(base_dir).train()
    backbone_model = model.scorer.backbone.model
    lora_modules = sorted(name for name, module in backbone_model.named_modules() if hasattr(module, "lora_A"))
    assert lora_modules == [f"model.layers.{i}.self_attn.{target}" for i in (0, 1) for target in RELEASED_TARGETS]
    names = model.trainable_parameter_names()
    prefix = "scorer.backbone.model."
    whole = {
        n.removeprefix(prefix).split(".")[1] for n in names if n.startswith(prefix + "model.") and "lora_" not in n
    }
    assert whole == {"vision_model", "visual_abstractor"}
    all_tower = {n for n, _ in model.named_parameters() if ".vision_model." in n or ".visual_abstractor." in n}
    assert all_tower <= set(names)
    assert f"{prefix}lm_head.weight" in names and f"{prefix}model.embed_tokens.weight" not in names
    # lm_head holds the score tokens' output rows: no separate ones
    assert "score_token_rows.input_rows" in names and model.score_token_rows.output_rows is None
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(2))
    outputs = model(torch.rand(2, 3, 30, 40), mos=torch.tensor([1.5, 4.5]))
    (outputs["raw_scores"].sum() + outputs["ce_loss"]).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


# ---------------------------------------------------------------------------------------- the trainer


def test_the_trainer_learns_with_the_recipe_and_trains_exactly_the_released_parts(trained):
    trainer, snapshot, output_dir = trained
    model = trainer.model
    assert model.scorer.is_gradient_checkpointing  # the recipe's setting
    lora_modules = sorted(n for n, m in model.scorer.backbone.model.named_modules() if hasattr(m, "lora_A"))
    assert lora_modules == [f"model.layers.{i}.self_attn.{target}" for i in (0, 1) for target in RELEASED_TARGETS]

    now = dict(model.named_parameters())
    changed = {name for name, before in snapshot.initial.items() if not torch.equal(now[name], before)}
    trainable = set(model.trainable_parameter_names())
    prefix = "scorer.backbone.model."
    for part in ("model.vision_model.", "model.visual_abstractor.", "lm_head.", "lora_B"):
        assert any(part in name for name in changed), part
    assert any(name.startswith("scorer.head.") for name in changed)
    assert changed <= trainable
    assert f"{prefix}model.embed_tokens.weight" not in changed
    assert f"{prefix}model.layers.0.self_attn.q_proj.base_layer.weight" not in changed
    assert f"{prefix}model.layers.0.self_attn.v_proj.multiway.0.weight" not in changed

    losses = [record["mse"] for record in map(json.loads, (output_dir / "train_log.jsonl").read_text().splitlines())]
    assert losses[-1] < 0.25 * losses[0], losses


def test_the_export_is_whole_weights_that_score_as_the_trained_model_with_two_passes(trained, base_dir, toy_manifest):
    trainer, _, output_dir = trained
    final = output_dir / "final"
    files = {path.name for path in final.iterdir()}
    assert {"model.safetensors", "head.safetensors", "qscorer_config.json"} <= files
    assert not files & {"adapter_model.safetensors", "trained_modules.safetensors", "score_tokens.safetensors"}
    assert not any("lora_" in name for name in load_file(final / "model.safetensors"))
    config = json.loads((final / "qscorer_config.json").read_text())
    assert (config["weights_format"], config["base_model"]) == ("full", None)

    # The trainer feeds decoded images as float pixels (the differentiable path); so do both here.
    pixels = to_unit_pixels(image_paths(toy_manifest))
    model = trainer.model.eval()
    loaded = QScorer.from_pretrained(final)
    with torch.no_grad():
        in_memory = model(pixels, compute_ce=False)["scores"]
        scores = loaded(pixels)
    torch.testing.assert_close(scores, in_memory, atol=1e-5, rtol=0)
    assert scores[-1] - scores[0] > 1.0  # brighter scores higher: it learned the toy target

    # The paper's evaluation reads the state of the token pass 1 emits after "is"; training taught
    # it to emit "▁", so that state is the one the training loss read (the same prefix, causal).
    backbone = loaded.backbone
    with torch.no_grad():
        passes = backbone.two_pass(backbone.prepare(pixels))
        mos = torch.linspace(1, 5, NUM_IMAGES)
        training_reading = model(pixels, compute_ce=False, mos=mos)["raw_scores"]
    space = loaded.tokenizer.convert_tokens_to_ids("▁")
    assert passes.greedy_tokens.tolist() == [space] * NUM_IMAGES
    torch.testing.assert_close(scores, training_reading, atol=1e-5, rtol=0)
    untrained = QScorer.from_base_model(base_dir, num_score_tokens=5).backbone
    with torch.no_grad():
        assert space not in untrained.two_pass(untrained.prepare(pixels)).greedy_tokens.tolist()


def test_bf16_weights_under_bf16_autocast_train_and_export(base_dir, toy_manifest, tmp_path):
    config = recipe(base_dir, toy_manifest, tmp_path / "out", dtype="bfloat16", mixed_precision="bf16", max_steps=2)
    trainer = ScoreTokenTrainer(config)
    trainer.train()
    trained_params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained_params)  # master weights
    loaded = QScorer.from_pretrained(tmp_path / "out" / "final")
    assert loaded.dtype == torch.bfloat16
    scores = loaded(image_paths(toy_manifest)[:2])
    assert torch.isfinite(scores).all()
