"""Reading the paper's released layout and converting it, on a tiny random release written by the
package's own code (`qscorer_reward.testing.official`): the merge, the overlay, the errors for
broken files, and the converted checkpoint that needs neither pickles nor the base folder."""

import datetime
import json
import shutil

import pytest
import torch

from qscorer_reward import QScorer
from qscorer_reward.official_checkpoint import convert_official, load_official
from qscorer_reward.testing.official import LORA_ALPHA, LORA_RANK, write_tiny_release

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = torch.rand(3, 3, 30, 44, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """``(lora_dir, base_dir)`` of the subset variant, shared by the module; tests copy before editing."""
    return write_tiny_release(tmp_path_factory.mktemp("release"), seed=0)


@pytest.fixture
def editable_release(tiny_release, tmp_path):
    lora, base = tiny_release
    return shutil.copytree(lora, tmp_path / "lora"), shutil.copytree(base, tmp_path / "base")


def test_the_release_loads_as_base_plus_overlay_plus_merged_lora(tiny_release):
    lora, base = tiny_release
    scorer = QScorer.from_pretrained(lora, base_model=base)
    state = scorer.backbone.model.state_dict()
    base_state = {}
    for shard in sorted(base.glob("pytorch_model-*.bin")):
        base_state |= torch.load(shard, weights_only=True)
    adapter = torch.load(lora / "adapter_model.bin", weights_only=True)
    trained = torch.load(lora / "non_lora_trainables.bin", weights_only=True)

    prefix = "base_model.model.model.layers.1.self_attn.v_proj.multiway.1"
    delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * (LORA_ALPHA / LORA_RANK)
    name = "model.layers.1.self_attn.v_proj.multiway.1.weight"
    assert torch.equal(state[name], base_state[name] + delta)
    text_expert = "model.layers.1.self_attn.v_proj.multiway.0.weight"
    assert torch.equal(state[text_expert], base_state[text_expert])  # not a LoRA target
    for name in ("model.vision_model.embeddings.cls_token", "lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(state[name], trained[f"base_model.model.{name}"])
    assert torch.equal(scorer.head.mlp[4].bias, trained["base_model.model.deepmlp.output_layer.bias"])

    vocabulary = len(scorer.tokenizer)
    assert scorer.config.score_token_ids == list(range(vocabulary - 5, vocabulary))
    assert scorer.config.backbone_family == "mplug_owl2" and scorer.score_range == (0.0, 5.0)
    assert not any(p.requires_grad for p in scorer.parameters())
    scores = scorer(IMAGES)
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_a_full_dump_and_a_subset_give_the_same_model(tiny_release, tmp_path):
    lora, base = write_tiny_release(tmp_path, seed=0, full_dump=True)
    assert len(torch.load(lora / "non_lora_trainables.bin", weights_only=True)) > len(
        torch.load(tiny_release[0] / "non_lora_trainables.bin", weights_only=True)
    )
    full_state = QScorer.from_pretrained(lora, base_model=base).state_dict()
    subset_state = QScorer.from_pretrained(tiny_release[0], base_model=tiny_release[1]).state_dict()
    assert all(torch.equal(tensor, full_state[name]) for name, tensor in subset_state.items())


# ------------------------------------------------------------------------------ refused input


def _edit_pickle(path, edit):
    tensors = torch.load(path, weights_only=True)
    edit(tensors)
    torch.save(tensors, path)


@pytest.mark.parametrize(
    "file, edit, message",
    [
        (
            "non_lora_trainables.bin",
            lambda t: t.__setitem__("base_model.model.model.vision_model.extra.weight", torch.zeros(2)),
            r"non_lora_trainables.bin: tensors \['model.vision_model.extra.weight'\] are not in the mPLUG-Owl2 model",
        ),
        (
            "non_lora_trainables.bin",
            lambda t: t.__setitem__("base_model.model.model.vision_model.post_layernorm.bias", torch.zeros(7)),
            r"non_lora_trainables.bin: tensor 'model.vision_model.post_layernorm.bias' has shape \(7,\), "
            r"expected \(32,\)",
        ),
        (
            "non_lora_trainables.bin",
            lambda t: t.__setitem__("base_model.model.deepmlp.output_layer.weight", torch.zeros(1, 9)),
            r"non_lora_trainables.bin: tensor 'deepmlp.output_layer.weight' has shape \(1, 9\), expected \(1, 8\)",
        ),
        (
            "non_lora_trainables.bin",
            lambda t: t.__setitem__("base_model.model.deepmlp.extra", torch.zeros(1)),
            r"non_lora_trainables.bin: missing tensors \[\], unexpected tensors \['deepmlp.extra'\]",
        ),
        (
            "adapter_model.bin",
            lambda t: t.__setitem__(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(LORA_RANK, 31)
            ),
            r"adapter_model.bin: tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape "
            r"\(4, 31\), expected \(4, 32\)",
        ),
        (
            "adapter_model.bin",
            lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.nothing.lora_A.weight", torch.zeros(4, 32)),
            r"adapter_model.bin: the LoRA target 'model.layers.0.mlp.nothing' is not a linear layer",
        ),
        (
            "adapter_model.bin",
            lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.weight", torch.zeros(32, 32)),
            r"adapter_model.bin: tensor 'base_model.model.model.layers.0.self_attn.q_proj.weight' is not a LoRA A/B",
        ),
        (
            "adapter_model.bin",
            lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"),
            r"adapter_model.bin: 'model.layers.1.self_attn.q_proj' has lora_A but not both",
        ),
    ],
    ids=["unknown", "mis-shaped", "head-shape", "head-unknown", "lora-shape", "lora-target", "lora-key", "lora-half"],
)
def test_unknown_and_mis_shaped_tensors_are_refused_by_name(editable_release, file, edit, message):
    lora, base = editable_release
    _edit_pickle(lora / file, edit)
    with pytest.raises(ValueError, match=message):
        load_official(lora, base)


def test_base_tensors_are_checked_too(editable_release):
    lora, base = editable_release
    shard = base / "pytorch_model-00002-of-00002.bin"
    _edit_pickle(shard, lambda t: t.__setitem__("model.norm.weight", torch.ones(33)))
    with pytest.raises(ValueError, match=r"00002-of-00002.bin: tensor 'model.norm.weight' has shape \(33,\)"):
        load_official(lora, base)
    _edit_pickle(shard, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"leave tensors \['model.norm.weight'\] missing"):
        load_official(lora, base)


@pytest.mark.parametrize(
    "file", ["lora/adapter_model.bin", "lora/non_lora_trainables.bin", "base/pytorch_model-00001-of-00002.bin"]
)
def test_a_truncated_pickle_is_named(editable_release, file):
    lora, base = editable_release
    path = lora.parent / file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{path.name} .* is truncated or not a PyTorch checkpoint"):
        load_official(lora, base)


@pytest.mark.parametrize("file", ["lora/adapter_model.bin", "lora/non_lora_trainables.bin"])
def test_a_pickle_holding_other_objects_is_refused_unread(editable_release, file):
    lora, base = editable_release
    path = lora.parent / file
    _edit_pickle(path, lambda t: t.__setitem__("saved_at", datetime.datetime(2025, 1, 1)))
    with pytest.raises(ValueError, match=f"{path.name} .* refused by torch.load\\(weights_only=True\\)"):
        load_official(lora, base)


def test_missing_files_are_named(editable_release):
    lora, base = editable_release
    (base / "pytorch_model.bin.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no pytorch_model.bin.index.json or pytorch_model.bin"):
        load_official(lora, base)
    (lora / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.bin not found: .* not a Q-Scorer checkpoint in the"):
        load_official(lora, base)


def test_the_released_layout_without_its_base_model_says_what_to_pass(tiny_release):
    with pytest.raises(ValueError, match="released layout: pass its base model too, base_model='MAGAer13"):
        QScorer.from_pretrained(tiny_release[0])


def test_a_tokenizer_model_without_sentencepiece_names_the_extra(editable_release, monkeypatch):
    from qscorer_reward import official_checkpoint

    lora, base = editable_release
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.model").write_bytes(b"")
    monkeypatch.setattr(official_checkpoint, "missing_official_packages", lambda: ["sentencepiece", "protobuf"])
    with pytest.raises(
        ImportError, match=r"needs sentencepiece and protobuf: pip install 'qscorer-reward\[official\]'"
    ):
        load_official(lora, base)


def test_unsupported_adapter_settings_are_refused(editable_release):
    lora, base = editable_release
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps(config | {"bias": "all"}))
    with pytest.raises(ValueError, match=r"unsupported adapter settings \{'bias': 'all'\}"):
        load_official(lora, base)


# ------------------------------------------------------------------------------ converted


def test_the_converted_checkpoint_needs_no_pickles_and_no_base(editable_release, tmp_path, monkeypatch):
    lora, base = editable_release
    direct = QScorer.from_pretrained(lora, base_model=base)
    convert_official(lora, base, tmp_path / "converted")
    assert not list((tmp_path / "converted").glob("*.bin"))
    assert (tmp_path / "converted" / "tokenizer.json").is_file()
    shutil.rmtree(lora)
    shutil.rmtree(base)

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickles)
    converted = QScorer.from_pretrained(tmp_path / "converted")
    assert converted.config == direct.config
    assert torch.equal(converted(IMAGES), direct(IMAGES))


def test_both_save_forms(tiny_release, tmp_path):
    scorer = QScorer.from_pretrained(tiny_release[0], base_model=tiny_release[1])
    expected = scorer(IMAGES)
    scorer.save_pretrained(tmp_path / "saved")  # the config's form: the whole model
    assert json.loads((tmp_path / "saved" / "qscorer_config.json").read_text())["weights_format"] == "full"
    assert torch.equal(QScorer.from_pretrained(tmp_path / "saved")(IMAGES), expected)
    # The release trains the vision tower, abstractor and lm_head in full: no base holds the rest.
    with pytest.raises(ValueError, match="trained_parts' needs config.base_model"):
        scorer.save_pretrained(tmp_path / "parts", weights_format="trained_parts")


def test_half_precision_and_gradient_checkpointing(tiny_release):
    full = QScorer.from_pretrained(tiny_release[0], base_model=tiny_release[1])
    half = QScorer.from_pretrained(tiny_release[0], base_model=tiny_release[1], dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in half.head.parameters())
    assert torch.allclose(half(IMAGES), full(IMAGES), atol=0.05)

    def gradient():
        pixels = IMAGES.clone().requires_grad_()
        full(pixels).sum().backward()
        return pixels.grad

    layer = full.backbone.model.model.layers[0]
    calls = []
    layer.self_attn.register_forward_hook(lambda *args: calls.append(1))
    plain = gradient()
    assert len(calls) == 2 and plain.abs().sum() > 0  # pass 1 and the appended token
    full.gradient_checkpointing_enable()
    calls.clear()
    checkpointed = gradient()
    assert len(calls) == 4  # each pass recomputed in backward
    full.gradient_checkpointing_disable()
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_every_input_kind_scores_and_bad_input_is_refused_as_for_any_scorer(tiny_release, tmp_path):
    import numpy as np
    from PIL import Image

    scorer = QScorer.from_pretrained(tiny_release[0], base_model=tiny_release[1])
    array = np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "image.png")
    expected = scorer(torch.from_numpy(array).permute(2, 0, 1))  # uint8: the reference's PIL path
    for images in (array, Image.fromarray(array), tmp_path / "image.png", [str(tmp_path / "image.png")]):
        assert torch.equal(scorer(images), expected)
    grey = np.full((20, 20), 90, dtype=np.uint8)
    assert torch.equal(scorer(grey), scorer(np.repeat(grey[..., None], 3, axis=-1)))
    assert scorer(np.stack([array, array])).shape == (2,)
    for images, error, message in (
        (42, TypeError, "got int"),
        ([IMAGES[0], {"a": 1}], TypeError, r"images\[1\] has unsupported type dict"),
        (IMAGES * 255, ValueError, "0..255"),
        ([], ValueError, "empty batch"),
    ):
        with pytest.raises(error, match=message):
            scorer(images)


def test_lora_on_the_released_targets_trains_through_both_passes(tiny_release):
    """What score-token fine-tuning of this backbone will do: peft LoRA on ``q_proj`` and the image
    expert ``v_proj.multiway.1``, the gradient of the score reaching them through the cached pass."""
    from peft import LoraConfig, inject_adapter_in_model

    scorer = QScorer.from_pretrained(tiny_release[0], base_model=tiny_release[1])
    model = scorer.backbone.model
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj.multiway.1"]), model)
    lora = {name: param for name, param in model.named_parameters() if "lora_" in name}
    assert {name.split(".self_attn.")[1].split(".lora_")[0] for name in lora} == {"q_proj", "v_proj.multiway.1"}
    for param in lora.values():
        param.requires_grad_(True)
    scorer(IMAGES).sum().backward()
    assert all(lora[name].grad.abs().sum() > 0 for name in lora if ".lora_B." in name)
