"""The native mPLUG-Owl2 backbone against the authors' code: every stage of their two-pass scoring
on the fixture's tiny model (both checkpoint variants, all four images), and the properties of the
one-cached-token second pass (batching, equality with a full second forward, gradients)."""

import functools
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from qscorer_reward import QScorer
from qscorer_reward.backbones.mplug_owl2 import IMAGE_TOKEN_INDEX, MPLUG_OWL2_PROMPT_TEMPLATE
from qscorer_reward.official_checkpoint import missing_official_packages

FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "qscorer_official_tiny"
VARIANTS = ("lora_full_dump", "lora_subset")
IMAGES = ("img0_landscape_64x48", "img1_portrait_40x72", "img2_square_56x56", "img3_strip_100x30")
STAGE_TOLERANCE = 1e-4

pytestmark = [
    pytest.mark.skipif(not FIXTURE.is_dir(), reason="needs ../shared/fixtures/qscorer_official_tiny (golden data)"),
    pytest.mark.skipif(
        bool(missing_official_packages()),
        reason="the fixture's tokenizer.model needs sentencepiece and protobuf: pip install -e '.[official]'",
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]


@functools.cache
def golden() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "golden.safetensors")


@functools.cache
def scorer(variant: str = "lora_subset") -> QScorer:
    """The fixture's Q-Scorer loaded from the released layout (shared; tests must not modify it)."""
    return QScorer.from_pretrained(FIXTURE / variant, base_model=FIXTURE / "base")


def image_path(stem: str) -> Path:
    return FIXTURE / "images" / f"{stem}.png"


def max_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return (ours.double() - reference.double()).abs().max().item()


def run_stages(model: QScorer, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The golden file's tensors, from our modules, for one image's pixel values ``[1, 3, S, S]``."""
    backbone = model.backbone
    lm = backbone.model.model
    seen: dict[str, list] = {"layers": [], "inputs_embeds": []}

    def keep(name):
        return lambda module, args, output: seen.__setitem__(name, output)

    hooks = [
        lm.vision_model.embeddings.register_forward_hook(keep("vision_embeddings")),
        lm.vision_model.register_forward_hook(keep("vision_last_hidden_state")),
        lm.visual_abstractor.encoder.register_forward_hook(keep("abstractor_pre_visual_fc")),
        lm.visual_abstractor.register_forward_hook(keep("abstractor_output")),
        lm.layers[0].register_forward_pre_hook(lambda module, args: seen["inputs_embeds"].append(args[0])),
        model.head.mlp[1].register_forward_hook(keep("deepmlp_hidden0")),
        model.head.mlp[3].register_forward_hook(keep("deepmlp_hidden1")),
    ]
    hooks += [layer.register_forward_hook(lambda m, a, output: seen["layers"].append(output[0])) for layer in lm.layers]
    inputs = backbone.prepare(torch.zeros(1, 3, 8, 8))
    inputs.model_inputs["pixel_values"] = pixel_values
    try:
        with torch.no_grad():
            result = backbone.two_pass(inputs)
            score = model.head(result.hidden_states[:, -1])
    finally:
        for hook in hooks:
            hook.remove()
    length = inputs.input_ids.shape[1]
    depth = len(lm.layers)
    pass1_layers, appended_layers = seen["layers"][:depth], seen["layers"][depth:]
    start, end = len(backbone.prefix_ids), len(backbone.prefix_ids) + backbone.num_image_rows
    indicators = torch.zeros(1, length + 1, dtype=torch.long)
    indicators[:, start:end] = 1
    hidden = result.hidden_states
    logits_pass2 = backbone.model.lm_head(hidden[:, -1])
    prompt = torch.tensor([backbone.prefix_ids + [IMAGE_TOKEN_INDEX] + backbone.suffix_ids])
    return {
        "input_ids_pass1": prompt,
        "input_ids_pass2": torch.cat([prompt, result.greedy_tokens[:, None]], dim=1),
        "vision_embeddings": seen["vision_embeddings"],
        "vision_last_hidden_state": seen["vision_last_hidden_state"],
        "abstractor_pre_visual_fc": seen["abstractor_pre_visual_fc"],
        "abstractor_output": seen["abstractor_output"],
        "llm_inputs_embeds_pass1": seen["inputs_embeds"][0],
        "llm_inputs_embeds_pass2": torch.cat(seen["inputs_embeds"], dim=1),
        "modality_indicators_pass1": indicators[:, :length],
        "modality_indicators_pass2": indicators,
        "llm_layer_outputs_pass1": torch.cat(pass1_layers),
        "llm_layer_outputs_pass2": torch.cat([torch.cat(pass1_layers), torch.cat(appended_layers)], dim=1),
        "llm_final_hidden_pass1": hidden[:, :length],
        "llm_final_hidden_pass2": hidden,
        "logits_last_pass1": result.greedy_logits,
        "logits_last_pass2": logits_pass2,
        "greedy_token_pass1": result.greedy_tokens,
        "greedy_token_pass2": logits_pass2.argmax(-1),
        "deepmlp_input": hidden[:, -1],
        "deepmlp_hidden0": seen["deepmlp_hidden0"],
        "deepmlp_hidden1": seen["deepmlp_hidden1"],
        "score": score,
        "score_token_logits_pass2": logits_pass2[0, list(reversed(model.config.score_token_ids))],
        "score_single_pass_reading": model.head(hidden[:, length - 1]),
    }


# ------------------------------------------------------------------------------ the reference's inputs


def test_prompt_ids_equal_the_references_for_both_of_its_prompts():
    backbone, tokenizer = scorer().backbone, scorer().tokenizer
    reference = golden()["prompt/input_ids_iqa_eval"].tolist()
    assert backbone.prefix_ids + [IMAGE_TOKEN_INDEX] + backbone.suffix_ids == reference
    # The other prompt of the authors' code (a newline before ASSISTANT) tokenizes as theirs too.
    prefix, suffix = backbone.prompt_ids(tokenizer, MPLUG_OWL2_PROMPT_TEMPLATE.replace("} ", "}\n"))
    assert prefix + [IMAGE_TOKEN_INDEX] + suffix == golden()["prompt/input_ids_scorer_py"].tolist()
    assert scorer().config.score_token_ids == [32000, 32001, 32002, 32003, 32004]
    assert tokenizer.convert_ids_to_tokens([32000, 32004]) == ["<score1>", "<score5>"]


def test_the_state_dict_has_the_released_names_and_shapes():
    """keys.txt section A lists the reference model's state dict; ours is the same, with the head
    (``deepmlp.*`` there) as this package's ScoreHead."""
    listed = {}
    for line in (FIXTURE / "keys.txt").read_text().split("# Section B")[0].splitlines():
        if line and not line.startswith("#"):
            name, shape, *_ = line.split("\t")
            listed[name] = tuple(int(v) for v in shape.strip("[]").split(", "))
    model = scorer()
    ours = {name: tuple(t.shape) for name, t in model.backbone.model.state_dict().items()}
    assert ours == {name: shape for name, shape in listed.items() if not name.startswith("deepmlp.")}
    head = {name: tuple(t.shape) for name, t in model.head.state_dict().items()}
    assert head == {"mlp.0.weight": (16, 32), "mlp.0.bias": (16,), "mlp.2.weight": (8, 16), "mlp.2.bias": (8,),
                    "mlp.4.weight": (1, 8), "mlp.4.bias": (1,)}  # fmt: skip


def test_a_fresh_models_sincos_tables_are_the_released_buffers():
    attention = scorer().backbone.model.model.visual_abstractor.encoder.layers[0].crossattention.attention
    queries, keys = attention.sincos_tables()
    torch.testing.assert_close(queries, attention.q_pos_embed, rtol=0, atol=1e-6)
    torch.testing.assert_close(keys, attention.k_pos_embed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stem", IMAGES)
def test_pixels_from_files_are_the_references_bit_for_bit(stem):
    backbone = scorer().backbone
    pixels = backbone.to_pixels([image_path(stem)], (0.0, 1.0), None, 10**8)
    assert pixels[0].dtype == torch.uint8
    values = backbone.prepare(pixels).model_inputs["pixel_values"]
    reference = golden()[f"lora_subset/{stem}/pixel_values_fp32"]
    assert torch.equal(values, reference)
    assert torch.equal(values.half(), golden()[f"lora_subset/{stem}/pixel_values"])
    # a PIL image and a uint8 array take the same path
    image = Image.open(image_path(stem))
    assert torch.equal(backbone.prepare(backbone.to_pixels(image, (0, 1), None, 10**8)).model_inputs["pixel_values"],
                       reference)  # fmt: skip


# ------------------------------------------------------------------------------ every stage


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("stem", IMAGES)
def test_every_stage_matches_the_golden_tensors_when_fed_the_golden_pixels(variant, stem):
    reference = {name.split("/")[-1]: t for name, t in golden().items() if name.startswith(f"{variant}/{stem}/")}
    ours = run_stages(scorer(variant), reference["pixel_values"].float())
    for name, tensor in ours.items():
        expected = reference[name]
        if name.startswith(("greedy_token", "modality", "input_ids")):
            assert torch.equal(tensor.reshape(expected.shape), expected), name
        else:
            difference = max_difference(tensor.reshape(expected.shape), expected)
            assert difference <= STAGE_TOLERANCE, f"{name}: max abs difference {difference:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_scores_from_the_image_files_match_the_reference(variant):
    model = scorer(variant)
    paths = [image_path(stem) for stem in IMAGES]
    scores = model(paths)
    reference = torch.stack([golden()[f"{variant}/{stem}/score"] for stem in IMAGES]).squeeze(1)
    fp32_reference = torch.stack([golden()[f"{variant}/{stem}/score_fp32_pixels"] for stem in IMAGES]).squeeze(1)
    assert max_difference(scores, reference) <= 1e-3  # the reference rounds its pixels to float16
    assert max_difference(scores, fp32_reference) <= STAGE_TOLERANCE
    backbone = model.backbone
    tokens = backbone.two_pass(backbone.prepare(backbone.to_pixels(paths, (0, 1), None, 10**8))).greedy_tokens
    expected = torch.cat([golden()[f"{variant}/{stem}/greedy_token_pass1"] for stem in IMAGES])
    assert torch.equal(tokens, expected)


def test_without_the_lora_delta_the_scores_are_the_references_no_lora_scores(tmp_path):
    """The reference run on a copy of the adapter with lora_B = 0: the merge is what moves the scores."""
    lora = tmp_path / "Qscorer_lora_no_delta"
    lora.mkdir()
    for name in ("config.json", "adapter_config.json", "non_lora_trainables.bin"):
        (lora / name).symlink_to(FIXTURE / "lora_subset" / name)
    adapter = torch.load(FIXTURE / "lora_subset" / "adapter_model.bin", weights_only=True)
    torch.save(
        {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in adapter.items()}, lora / "adapter_model.bin"
    )
    model = QScorer.from_pretrained(lora, base_model=FIXTURE / "base")
    for stem in IMAGES:
        reference = {name: golden()[f"lora_subset/{stem}/{name}"] for name in ("score_no_lora", "pixel_values")}
        ours = run_stages(model, reference["pixel_values"].float())
        assert max_difference(ours["score"], reference["score_no_lora"]) <= STAGE_TOLERANCE
        assert torch.equal(ours["greedy_token_pass1"], golden()[f"lora_subset/{stem}/greedy_token_pass1_no_lora"])


def test_scores_are_unclamped_by_default_and_bounded_on_request():
    paths = [image_path(stem) for stem in IMAGES]
    model = scorer()
    assert model.score_range == (0.0, 5.0)
    scores = model(paths)
    assert (scores > 5).sum() == 2  # as the reference reports them
    clamped = QScorer.from_pretrained(FIXTURE / "lora_subset", base_model=FIXTURE / "base", score_bound="clamp")
    torch.testing.assert_close(clamped(paths), scores.clamp(0, 5))
    clamped.set_score_bound("soft_clamp")
    assert (clamped(paths) < 5).all()


# ------------------------------------------------------------------------------ two passes, one cached token


def test_the_cached_second_pass_equals_a_full_second_forward():
    backbone = scorer().backbone
    generator = torch.Generator().manual_seed(0)
    inputs = backbone.prepare(torch.rand(3, 3, 50, 70, generator=generator))
    with torch.no_grad():
        cached = backbone.two_pass(inputs)
        image_rows = backbone.model.model.image_rows(inputs.model_inputs["pixel_values"])
        embeds, span = backbone.embed(inputs.input_ids, image_rows)
        appended = backbone.model.get_input_embeddings()(cached.greedy_tokens)[:, None]
        full, _ = backbone.model(torch.cat([embeds, appended], dim=1), span)
    assert max_difference(cached.hidden_states, full) <= 1e-5
    assert torch.equal(inputs.score_positions, torch.full((3,), inputs.input_ids.shape[1]))


def test_a_batch_scores_as_its_images_do_alone():
    model = scorer()
    generator = torch.Generator().manual_seed(1)
    images = [image_path(IMAGES[0]), torch.rand(3, 61, 45, generator=generator), Image.open(image_path(IMAGES[3]))]
    together = model(images)
    alone = torch.cat([model([image]) for image in images])
    assert max_difference(together, alone) <= 1e-5
    batch = torch.rand(4, 3, 40, 60, generator=generator)
    assert max_difference(model(batch), torch.cat([model(image) for image in batch])) <= 1e-5


def test_gradients_reach_the_pixels_and_match_finite_differences_in_float64():
    model = QScorer.from_pretrained(FIXTURE / "lora_subset", base_model=FIXTURE / "base").double()
    generator = torch.Generator().manual_seed(0)
    # values away from 0 and 1, so the clamps after each resize pass stay inactive
    image = (0.2 + 0.6 * torch.rand(1, 3, 48, 64, generator=generator, dtype=torch.float64)).requires_grad_()
    score = model(image)
    assert score.dtype == torch.float64
    (gradient,) = torch.autograd.grad(score.sum(), image)
    assert gradient.abs().sum() > 0
    epsilon = 1e-4
    for channel, row, column in [(0, 0, 0), (1, 20, 31), (2, 47, 63), (0, 33, 5)]:
        step = torch.zeros_like(image)
        step[0, channel, row, column] = epsilon
        with torch.no_grad():
            numeric = ((model(image + step) - model(image - step)) / (2 * epsilon)).item()
        assert numeric == pytest.approx(gradient[0, channel, row, column].item(), rel=1e-5, abs=1e-9)


def test_the_float_path_stays_close_to_the_reference_pixels():
    """The differentiable path differs from PIL's only by PIL's 8-bit rounding between resize passes."""
    backbone = scorer().backbone
    for stem in IMAGES:
        eight_bit = backbone.to_pixels([image_path(stem)], (0, 1), None, 10**8)
        floats = [eight_bit[0].float() / 255]
        difference = max_difference(
            backbone.prepare(floats).model_inputs["pixel_values"],
            golden()[f"lora_subset/{stem}/pixel_values_fp32"],
        )
        assert difference < 0.03, f"{stem}: {difference:.4f}"  # a few 8-bit steps, normalised
