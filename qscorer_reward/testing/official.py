"""A tiny random Q-Scorer in the paper's released layout, written offline by this package's own
mPLUG-Owl2 code: a base folder as ``MAGAer13/mplug-owl2-llama2-7b`` is stored (pickle shards with
an index, config, tokenizer, image processor config) and a LoRA folder as ``2kxx/Qscorer_lora_5_1``
is (``adapter_model.bin``, ``adapter_config.json``, ``non_lora_trainables.bin``, ``config.json``).

The tokenizer is a LLaMA-style byte-fallback tokenizer built with ``tokenizers`` (saved as
``tokenizer.json``, so no ``sentencepiece`` is needed); the real base ships ``tokenizer.model``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

LORA_RANK = 4
LORA_ALPHA = 8
NUM_SCORE_TOKENS = 5
IMAGE_SIZE = 28


def tiny_llama_tokenizer():
    """A LLaMA-2-style tokenizer (``<unk> <s> </s>``, 256 byte tokens, ``▁``, printable ASCII)."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    for piece in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(piece, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[])


def tiny_mplug_owl2_config(vocab_size: int):
    """A 2-layer mPLUG-Owl2 config: LLM width 32, ViT width 32 on 28 px images (2 x 2 patches),
    abstractor with 4 queries (5 rows for the language model)."""
    from qscorer_reward.backbones.mplug_owl2 import MplugOwl2Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=14, layer_norm_eps=1e-6, hidden_act="quick_gelu")  # fmt: skip
    abstractor = dict(hidden_size=32, encoder_hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_learnable_queries=4, grid_size=2, layer_norm_eps=1e-6)  # fmt: skip
    return MplugOwl2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        visual_config={"visual_model": vision, "visual_abstractor": abstractor},
    )


def write_tiny_release(directory: str | Path, seed: int = 0, full_dump: bool = False) -> tuple[Path, Path]:
    """Write ``directory/base`` and ``directory/lora``; returns ``(lora_dir, base_dir)``.

    ``full_dump``: ``non_lora_trainables.bin`` holds every non-LoRA tensor (the paper's commit)
    instead of the trained ones only. The trained tensors are the base's plus noise, the LoRA
    matrices non-zero, the head's widths 32 -> 16 -> 8 -> 1.
    """
    from qscorer_reward.backbones.mplug_owl2 import MplugOwl2ForCausalLM

    directory = Path(directory)
    base_dir, lora_dir = directory / "base", directory / "lora"
    tokenizer = tiny_llama_tokenizer()
    config = tiny_mplug_owl2_config(len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = MplugOwl2ForCausalLM(config)
        trained_model = MplugOwl2ForCausalLM(tiny_mplug_owl2_config(len(tokenizer) + NUM_SCORE_TOKENS))
        generator = torch.Generator().manual_seed(seed + 1)
        trained_state = _trained_state(base.state_dict(), trained_model.state_dict(), generator)
        adapter = _adapter(config, generator)
        head = _head(config.hidden_size, generator)

    base_dir.mkdir(parents=True)
    _save_shards(base.state_dict(), base_dir)
    config.to_json_file(base_dir / "config.json")
    tokenizer.save_pretrained(base_dir)
    (base_dir / "preprocessor_config.json").write_text(json.dumps(_processor_config()))

    lora_dir.mkdir(parents=True)
    trained_model.config.to_json_file(lora_dir / "config.json")
    targets = sorted({name.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for name in adapter})
    adapter_config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=LORA_RANK, lora_alpha=LORA_ALPHA,
                          lora_dropout=0.05, bias="none", fan_in_fan_out=False, target_modules=targets)  # fmt: skip
    (lora_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    torch.save(adapter, lora_dir / "adapter_model.bin")
    # Parameters only: the abstractor's position buffers are never in the dump.
    trained = {
        name: tensor
        for name, tensor in trained_state.items()
        if (full_dump and "_pos_embed" not in name) or _is_trained(name)
    }
    dump = {f"base_model.model.{name}": tensor for name, tensor in (trained | head).items()}
    torch.save(dump, lora_dir / "non_lora_trainables.bin")
    return lora_dir, base_dir


def _trained_state(base: dict, shapes: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor after the emulated training: the trained ones are the base's plus noise (the
    vocabulary rows grown by the score tokens, starting at the mean), the others the base's."""
    state = {}
    for name, like in shapes.items():
        tensor = base[name].clone()
        if not _is_trained(name):
            state[name] = tensor
            continue
        if tensor.shape != like.shape:
            tensor = torch.cat([tensor, tensor.mean(0, keepdim=True).expand(like.shape[0] - tensor.shape[0], -1)])
        state[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
    return state


def _is_trained(name: str) -> bool:
    """What the released training updates in full: the vision tower, abstractor, lm_head, embed_tokens."""
    return any(part in name for part in ("vision_model.", "visual_abstractor.", "lm_head.", "embed_tokens."))


def _adapter(config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    width = config.hidden_size
    adapter = {}
    for layer in range(config.num_hidden_layers):
        for module in ("self_attn.q_proj", "self_attn.v_proj.multiway.1"):
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(LORA_RANK, width, generator=generator) / width**0.5
            adapter[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(width, LORA_RANK, generator=generator)
    return adapter


def _head(hidden_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    widths = [hidden_size, hidden_size // 2, hidden_size // 4]
    names = [f"deepmlp.model.{i}.linear" for i in range(2)] + ["deepmlp.output_layer"]
    head = {}
    for name, width_in, width_out in zip(names, widths, [*widths[1:], 1]):
        head[f"{name}.weight"] = torch.randn(width_out, width_in, generator=generator) * (2 / width_in) ** 0.5
        head[f"{name}.bias"] = 0.1 * torch.randn(width_out, generator=generator)
    head["deepmlp.output_layer.bias"] += 3.0
    return head


def _save_shards(state: dict[str, torch.Tensor], directory: Path) -> None:
    """Two pickle shards (embeddings, the rest) and their index, as transformers 4 wrote them."""
    first = {name for name in state if "embed_tokens" in name}
    shards = {"pytorch_model-00001-of-00002.bin": first, "pytorch_model-00002-of-00002.bin": set(state) - first}
    weight_map = {}
    for file, names in shards.items():
        torch.save({name: state[name].clone() for name in sorted(names)}, directory / file)
        weight_map |= {name: file for name in names}
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def _processor_config() -> dict:
    from qscorer_reward.scorer import CLIP_MEAN, CLIP_STD

    return dict(crop_size=IMAGE_SIZE, size=IMAGE_SIZE, do_center_crop=True, do_normalize=True, do_resize=True,
                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)  # fmt: skip
