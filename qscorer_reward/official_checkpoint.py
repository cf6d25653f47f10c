"""The paper's released Q-Scorer, read in the layout it is published in, and converted once to
this package's checkpoint format.

The release is a LoRA checkpoint on mPLUG-Owl2 (``2kxx/Qscorer_lora_5_1`` on
``MAGAer13/mplug-owl2-llama2-7b``)::

    LORA_DIR   config.json               the architecture, vocabulary including the score tokens
               adapter_config.json       peft LoRA config (r, lora_alpha, target modules)
               adapter_model.bin         LoRA A/B matrices (pickle)
               non_lora_trainables.bin   every other trained tensor (pickle): the vision tower, the
                                         abstractor, lm_head, embed_tokens and the head (``deepmlp``);
                                         in the paper's commit every non-LoRA tensor
    BASE_DIR   pytorch_model-*.bin + pytorch_model.bin.index.json (or pytorch_model.bin),
               tokenizer.model (LLaMA-2), tokenizer_config.json, preprocessor_config.json

`load_official` builds the model the way the authors' loader does: the architecture of
``LORA_DIR/config.json``, the base weights, the ``non_lora_trainables.bin`` overlay, then
``W + (B @ A) * lora_alpha / r`` merged into every LoRA target; the K score tokens are the
tokenizer's new ids beyond the base vocabulary. Unlike the authors' loader, it refuses tensors the
model does not have or of the wrong shape, naming them. Pickles are read with
``torch.load(weights_only=True)`` only. `convert_official` writes the result as this package's
safetensors checkpoint (`qscorer_reward.checkpoint`), which loads without pickles, without the
base folder and without the ``[official]`` extra. `load_official_base` reads the base alone, with
new score tokens and a fresh head: where the paper's training starts (``docs/training.md``).
"""

from __future__ import annotations

import json
import os
import pickle
from importlib.util import find_spec
from pathlib import Path

import torch

from qscorer_reward.checkpoint import LoadedCheckpoint, check_tensors, resolve_checkpoint, write_checkpoint
from qscorer_reward.config import QScorerConfig
from qscorer_reward.head import ScoreHead

RELEASED_CHECKPOINT = "2kxx/Qscorer_lora_5_1"
RELEASED_BASE_MODEL = "MAGAer13/mplug-owl2-llama2-7b"

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.bin"
NON_LORA_FILE = "non_lora_trainables.bin"
MODEL_CONFIG_FILE = "config.json"
RELEASED_FILES = (MODEL_CONFIG_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, NON_LORA_FILE)
BASE_INDEX_FILE = "pytorch_model.bin.index.json"
BASE_SINGLE_FILE = "pytorch_model.bin"

# The paper's evaluation reports the head's output unclamped; its nominal range is the training clamp.
NOMINAL_SCORE_RANGE = (0.0, 5.0)
HEAD_PREFIX = "deepmlp."
PEFT_PREFIX = "base_model.model."
EXTRA_HINT = "pip install 'qscorer-reward[official]'"


def is_released_layout(directory: str | os.PathLike | None) -> bool:
    """Whether ``directory`` is a local folder in the released layout (``adapter_model.bin`` and
    ``non_lora_trainables.bin`` beside their configs)."""
    return directory is not None and all((Path(directory) / name).is_file() for name in RELEASED_FILES)


def load_official(
    checkpoint: str | os.PathLike, base_model: str | os.PathLike | None, *, dtype: torch.dtype | None = None
) -> LoadedCheckpoint:
    """The released Q-Scorer's parts, which `QScorer.from_pretrained` wires together (on the CPU,
    LoRA merged).

    Args:
        checkpoint: ``LORA_DIR``, a local folder or hub id (`RELEASED_CHECKPOINT`).
        base_model: ``BASE_DIR``, a local folder or hub id (`RELEASED_BASE_MODEL`).
        dtype: weight dtype of the backbone (default: the base weights' own); merging is done in
            float32 either way. The head stays float32.

    Scores are the head's raw output, as the paper's evaluation reports them (`QScorer.score_range`
    is the nominal ``(0, 5)``).
    """
    # transformers' modeling code, imported only when a model is built
    from qscorer_reward.backbones.mplug_owl2 import MPLUG_OWL2_PROMPT_TEMPLATE, MplugOwl2Config, MplugOwl2ForCausalLM

    if base_model is None:
        raise ValueError(
            f"{checkpoint} is a Q-Scorer checkpoint in the paper's released layout: pass its base model too, "
            f"base_model={RELEASED_BASE_MODEL!r} or a local copy (or convert it once with `qscorer convert-official`)"
        )
    lora_dir = resolve_checkpoint(checkpoint)
    base_dir = resolve_checkpoint(base_model)
    for name in RELEASED_FILES:
        if not (lora_dir / name).is_file():
            raise FileNotFoundError(
                f"{lora_dir / name} not found: {lora_dir} is not a Q-Scorer checkpoint in the released layout "
                f"({', '.join(RELEASED_FILES)})"
            )
    model_config = MplugOwl2Config.from_json_file(lora_dir / MODEL_CONFIG_FILE)
    tokenizer = read_base_tokenizer(base_dir)
    num_score_tokens = model_config.vocab_size - len(tokenizer)
    if num_score_tokens < 1:
        raise ValueError(
            f"{lora_dir / MODEL_CONFIG_FILE}: vocab_size {model_config.vocab_size} leaves no room for score tokens "
            f"beyond the base tokenizer's {len(tokenizer)} tokens"
        )

    with torch.device("meta"):
        model = MplugOwl2ForCausalLM(model_config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    base = read_base_weights(base_dir, expected)
    trained = normalise_trained_keys(read_pickle(lora_dir / NON_LORA_FILE, "the non-LoRA trained tensors"))
    head_state = {name: tensor for name, tensor in trained.items() if name.startswith(HEAD_PREFIX)}
    trained = {name: tensor for name, tensor in trained.items() if not name.startswith(HEAD_PREFIX)}
    check_known_tensors(trained, expected, lora_dir / NON_LORA_FILE)
    state = {**base, **trained}
    missing = sorted(name for name in expected if name not in state or tuple(state[name].shape) != expected[name])
    if missing:
        raise ValueError(
            f"{base_dir} and {lora_dir / NON_LORA_FILE} leave tensors {missing[:5]} missing or short (the base has "
            "fewer vocabulary rows than the checkpoint and the trained tensors do not fill them)"
        )
    merge_lora(state, lora_dir)
    target_dtype = dtype or base["model.embed_tokens.weight"].dtype
    model.load_state_dict({name: tensor.to(target_dtype, copy=True) for name, tensor in state.items()}, assign=True)

    head = head_from_deepmlp(head_state, model_config.hidden_size, lora_dir / NON_LORA_FILE)
    score_tokens = [f"<score{i + 1}>" for i in range(num_score_tokens)]
    tokenizer.add_tokens(score_tokens, special_tokens=True)
    config = mplug_owl2_config(
        model_config,
        base_dir,
        MPLUG_OWL2_PROMPT_TEMPLATE,
        num_score_tokens,
        tokenizer.convert_tokens_to_ids(score_tokens),
        head.hidden_sizes,
        model_name=f"Q-Scorer {Path(str(checkpoint)).name} on {Path(str(base_model)).name}",
    )
    return LoadedCheckpoint(config, model, tokenizer, head, adapter_merged=False)


def load_official_base(
    base_model: str | os.PathLike,
    *,
    num_score_tokens: int = 5,
    prompt_template: str | None = None,
    head_hidden_sizes: list[int] | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """A new, untrained Q-Scorer on the released mPLUG-Owl2 base, where the paper's training starts
    (`QScorer.from_base_model` calls this for such a base).

    The base's weights and tokenizer (``BASE_DIR`` as `RELEASED_BASE_MODEL` is stored, or that
    hub id), the K score tokens ``<score1>`` ... ``<scoreK>`` added after the vocabulary (ids
    32000... on LLaMA-2) with their input and output rows at the mean of the existing rows, and a
    fresh head as released: widths ``h -> h/2 -> h/4 -> 1`` (4096 -> 2048 -> 1024 -> 1) unless
    ``head_hidden_sizes``, Kaiming-normal weights and zero biases (drawn from torch's global
    generator), regressing the score itself, unbounded (as `load_official` reads the release).

    Args:
        base_model: ``BASE_DIR``, a local folder or hub id.
        num_score_tokens: K (the release: 5).
        prompt_template: default `MPLUG_OWL2_PROMPT_TEMPLATE`, the paper's evaluation prompt.
        head_hidden_sizes: the head's hidden widths.
        dtype: weight dtype of the backbone (default: the base weights' own).

    The config has no ``base_model``: this package's checkpoints never read the base's pickles,
    so a model trained from here is saved whole (``weights_format="full"``).
    """
    from qscorer_reward.backbones.mplug_owl2 import MPLUG_OWL2_PROMPT_TEMPLATE, MplugOwl2Config, MplugOwl2ForCausalLM
    from qscorer_reward.score_tokens import add_score_tokens

    base_dir = resolve_checkpoint(base_model)
    config_path = base_dir / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: the base model's config is missing")
    model_config = MplugOwl2Config.from_json_file(config_path)
    tokenizer = read_base_tokenizer(base_dir)
    if model_config.vocab_size != len(tokenizer):
        raise ValueError(
            f"{config_path}: vocab_size {model_config.vocab_size} differs from the tokenizer's {len(tokenizer)} "
            "tokens: not the base model (a Q-Scorer checkpoint loads with QScorer.from_pretrained)"
        )
    with torch.device("meta"):
        model = MplugOwl2ForCausalLM(model_config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    base = read_base_weights(base_dir, expected)
    missing = sorted(name for name in expected if name not in base or tuple(base[name].shape) != expected[name])
    if missing:
        raise ValueError(f"{base_dir}: the base weights lack tensors {missing[:5]} ({len(missing)} missing)")
    target_dtype = dtype or base["model.embed_tokens.weight"].dtype
    model.load_state_dict({name: tensor.to(target_dtype, copy=True) for name, tensor in base.items()}, assign=True)

    score_tokens = [f"<score{i + 1}>" for i in range(num_score_tokens)]
    score_token_ids = add_score_tokens(model, tokenizer, score_tokens)
    head = ScoreHead(model_config.hidden_size, head_hidden_sizes, NOMINAL_SCORE_RANGE, bound="none", centered=False)
    config = mplug_owl2_config(
        model_config,
        base_dir,
        prompt_template or MPLUG_OWL2_PROMPT_TEMPLATE,
        num_score_tokens,
        score_token_ids,
        head.hidden_sizes,
        model_name=f"Q-Scorer (untrained) on {Path(str(base_model)).name}",
    )
    return LoadedCheckpoint(config, model, tokenizer, head, adapter_merged=False)


def is_released_base(path: str | os.PathLike) -> bool:
    """Whether ``path`` is `RELEASED_BASE_MODEL` or a local folder stored as it is: an
    ``mplug_owl2`` config beside pickle weights."""
    if str(path) == RELEASED_BASE_MODEL:
        return True
    directory = Path(path)
    has_pickles = (directory / BASE_INDEX_FILE).is_file() or (directory / BASE_SINGLE_FILE).is_file()
    if not (has_pickles and (directory / MODEL_CONFIG_FILE).is_file()):
        return False
    try:
        return json.loads((directory / MODEL_CONFIG_FILE).read_text()).get("model_type") == "mplug_owl2"
    except (json.JSONDecodeError, AttributeError):
        return False


def mplug_owl2_config(
    model_config,
    base_dir: Path,
    prompt_template: str,
    num_score_tokens: int,
    score_token_ids: list[int],
    head_hidden_sizes: list[int],
    model_name: str,
) -> QScorerConfig:
    """The `QScorerConfig` of a Q-Scorer on mPLUG-Owl2 (``model_config``, an ``MplugOwl2Config``):
    images at the vision tower's fixed size, normalised as the base's image processor says, the
    head unbounded and uncentred as released (`score_range` the nominal (0, 5) of the training
    clamp). No ``base_model``: the release trains the vision tower, abstractor and lm_head whole
    and its base is stored as pickles, so such a model is saved whole (``weights_format="full"``)."""
    image_size = model_config.vision.image_size
    processor = read_processor_config(base_dir, image_size)
    return QScorerConfig(
        backbone_family=model_config.model_type,
        prompt_template=prompt_template,
        num_score_tokens=num_score_tokens,
        score_token_ids=score_token_ids,
        head_hidden_sizes=head_hidden_sizes,
        score_range=NOMINAL_SCORE_RANGE,
        score_bound="none",
        head_centered=False,
        min_pixels=image_size**2,
        max_pixels=image_size**2,
        patch_size=model_config.vision.patch_size,
        merge_size=1,
        temporal_patch_size=1,
        image_mean=processor.get("image_mean", QScorerConfig.image_mean),
        image_std=processor.get("image_std", QScorerConfig.image_std),
        model_name=model_name,
    )


def convert_official(
    checkpoint: str | os.PathLike,
    base_model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Load the release (`load_official`) and write it to ``output`` in this package's format
    (``weights_format="full"``: safetensors, tokenizer.json, no pickles). Returns what it wrote."""
    loaded = load_official(checkpoint, base_model, dtype=dtype)
    loaded.config.weights_format = "full"
    write_checkpoint(output, loaded.config, loaded.head.state_dict(), loaded.tokenizer, backbone=loaded.model)
    return loaded


# ---------------------------------------------------------------------------------------- pieces


def read_pickle(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A pickled ``{name: tensor}`` file, read with ``torch.load(weights_only=True)``; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint is missing {what}")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} ({what}) was refused by torch.load(weights_only=True): it holds objects other than "
            f"tensors, which are never unpickled ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path} ({what}) is truncated or not a PyTorch checkpoint: {err}") from err
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{path} ({what}) holds a {type(tensors).__name__}, not a dict of tensors")
    return tensors


def read_base_weights(base_dir: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The base's tensors from its pickle shards (via the index) or single file. Each must be a
    tensor of the model; embedding rows may be fewer than the model's (the base vocabulary)."""
    index_path = base_dir / BASE_INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path} is not a weights index (a JSON object with a weight_map): {err}") from err
        files = sorted(set(weight_map.values()))
    elif (base_dir / BASE_SINGLE_FILE).is_file():
        files = [BASE_SINGLE_FILE]
    else:
        raise FileNotFoundError(
            f"{base_dir}: no {BASE_INDEX_FILE} or {BASE_SINGLE_FILE}; expected the base model's weights "
            f"in the layout of {RELEASED_BASE_MODEL}"
        )
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        path = base_dir / name
        tensors = read_pickle(path, "base model weights")
        check_known_tensors(tensors, expected, path, shorter_rows=("model.embed_tokens.weight", "lm_head.weight"))
        weights.update(tensors)
    return weights


def check_known_tensors(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    path: Path,
    shorter_rows: tuple[str, ...] = (),
) -> None:
    """Refuse tensors the model does not have, or of another shape (``shorter_rows``: those that
    may have fewer rows), naming the file and the tensors."""
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:5]} are not in the mPLUG-Owl2 model ({len(unknown)} unknown)")
    for name, tensor in tensors.items():
        shape, wanted = tuple(tensor.shape), expected[name]
        fits = shape == wanted or (
            name in shorter_rows and len(shape) == 2 and shape[1] == wanted[1] and shape[0] <= wanted[0]
        )
        if not fits:
            raise ValueError(f"{path}: tensor {name!r} has shape {shape}, expected {wanted}")


def normalise_trained_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved names -> model names, as the authors' loader maps them: drop ``base_model.``, then one
    leading ``model.`` when some name starts with ``model.model.``."""
    names = {name.removeprefix("base_model."): tensor for name, tensor in tensors.items()}
    if any(name.startswith("model.model.") for name in names):
        names = {name.removeprefix("model."): tensor for name, tensor in names.items()}
    return names


def merge_lora(state: dict[str, torch.Tensor], lora_dir: Path) -> None:
    """Merge the adapter into ``state`` in place: ``W + (B @ A) * scale`` in float32, with
    ``scale = lora_alpha / r`` from ``adapter_config.json``."""
    config_path = lora_dir / ADAPTER_CONFIG_FILE
    try:
        adapter_config = json.loads(config_path.read_text())
        rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: cannot read r and lora_alpha ({err})") from err
    unsupported = {
        key: adapter_config[key]
        for key, plain in (("peft_type", "LORA"), ("bias", "none"), ("fan_in_fan_out", False))
        if adapter_config.get(key, plain) != plain
    }
    unsupported |= {key: adapter_config[key] for key in ("rank_pattern", "alpha_pattern") if adapter_config.get(key)}
    if unsupported:
        raise ValueError(f"{config_path}: unsupported adapter settings {unsupported}")
    scale = alpha / rank**0.5 if adapter_config.get("use_rslora") else alpha / rank

    path = lora_dir / ADAPTER_WEIGHTS_FILE
    adapter = read_pickle(path, "the LoRA adapter")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapter.items():
        module, dot, part = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not (name.startswith(PEFT_PREFIX) and dot and part in ("A.weight", "B.weight")):
            raise ValueError(
                f"{path}: tensor {name!r} is not a LoRA A/B weight (base_model.model.<module>.lora_A.weight)"
            )
        pairs.setdefault(module, {})[part[0]] = tensor
    for module, pair in pairs.items():
        target = f"{module}.weight"
        if target not in state or state[target].ndim != 2:
            raise ValueError(f"{path}: the LoRA target {module!r} is not a linear layer of the mPLUG-Owl2 model")
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{path}: {module!r} has lora_{''.join(pair)} but not both lora_A and lora_B")
        out_features, in_features = state[target].shape
        for part, shape in (("A", (rank, in_features)), ("B", (out_features, rank))):
            if tuple(pair[part].shape) != shape:
                raise ValueError(
                    f"{path}: tensor {PEFT_PREFIX}{module}.lora_{part}.weight has shape "
                    f"{tuple(pair[part].shape)}, expected {shape} (r={rank})"
                )
        delta = (pair["B"].float() @ pair["A"].float()) * scale
        state[target] = state[target].float() + delta


def head_from_deepmlp(tensors: dict[str, torch.Tensor], hidden_size: int, path: Path) -> ScoreHead:
    """The released head (``deepmlp.model.N.linear``, ``deepmlp.output_layer``) as an unbounded,
    uncentred `ScoreHead` computing the same function: ``relu`` after each hidden layer."""
    layers = sorted({int(name.split(".")[2]) for name in tensors if name.startswith("deepmlp.model.")})
    if not tensors:
        raise ValueError(f"{path}: no head tensors (deepmlp.*): the trained head is missing")
    if layers != list(range(len(layers))):
        raise ValueError(f"{path}: head layers deepmlp.model.{layers} are not numbered 0..{len(layers) - 1}")
    hidden_sizes = [int(tensors.get(f"deepmlp.model.{i}.linear.weight", torch.empty(0)).shape[0]) for i in layers]
    widths = [hidden_size, *hidden_sizes]
    if any(a == b for a, b in zip(widths[:-1], widths[1:])):
        # The released class adds a residual to a block whose input and output widths agree.
        raise ValueError(f"{path}: head widths {widths} include a residual block, which ScoreHead does not model")
    head = ScoreHead(hidden_size, hidden_sizes, NOMINAL_SCORE_RANGE, bound="none", centered=False)
    released_names = [f"deepmlp.model.{i}.linear" for i in layers] + ["deepmlp.output_layer"]
    renamed = {}
    for index, released in enumerate(released_names):
        for kind in ("weight", "bias"):
            renamed[f"{released}.{kind}"] = f"mlp.{2 * index}.{kind}"
    expected = {released: tuple(head.state_dict()[ours].shape) for released, ours in renamed.items()}
    check_tensors(tensors, expected, path)
    head.load_state_dict({ours: tensors[released].float() for released, ours in renamed.items()})
    return head


def read_base_tokenizer(base_dir: Path):
    """The base's LLaMA-2 tokenizer. A ``tokenizer.model`` alone (as released) is converted by
    transformers, which needs ``sentencepiece`` and ``protobuf`` (the ``[official]`` extra)."""
    from transformers import AutoTokenizer

    if not (base_dir / "tokenizer.json").is_file():
        if not (base_dir / "tokenizer.model").is_file():
            raise FileNotFoundError(f"{base_dir}: no tokenizer.model or tokenizer.json (the LLaMA-2 tokenizer)")
        missing = missing_official_packages()
        if missing:
            raise ImportError(
                f"reading {base_dir / 'tokenizer.model'} (the LLaMA-2 tokenizer of the released base) needs "
                f"{' and '.join(missing)}: {EXTRA_HINT}"
            )
    try:
        return AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"{base_dir}: cannot load the tokenizer ({err})") from err


def read_processor_config(base_dir: Path, image_size: int) -> dict:
    """The base's ``preprocessor_config.json`` (empty if absent), checked to describe the
    reference's preprocessing at the vision tower's input size."""
    path = base_dir / "preprocessor_config.json"
    if not path.is_file():
        return {}
    processor = json.loads(path.read_text())
    sizes = {_side(processor.get("size", image_size)), _side(processor.get("crop_size", image_size))}
    if sizes != {image_size} or processor.get("resample", 3) != 3:
        raise ValueError(
            f"{path}: expected bicubic resizing (resample 3) to {image_size} px, the vision tower's input size; "
            f"got size {processor.get('size')}, crop_size {processor.get('crop_size')}, "
            f"resample {processor.get('resample')}"
        )
    return processor


def _side(size) -> int:
    """A processor size entry (an int or a dict of them) as one side length."""
    if isinstance(size, dict):
        return int(size.get("shortest_edge", size.get("height", 0)))
    return int(size)


def missing_official_packages() -> list[str]:
    """The packages of the ``[official]`` extra that are not installed (transformers reads a
    SentencePiece ``tokenizer.model`` with them)."""
    missing = []
    for package, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf")):
        try:
            found = find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            missing.append(package)
    return missing
