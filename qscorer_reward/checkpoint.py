"""Q-Scorer checkpoint directories: writing them atomically and loading them with precise errors.

Layout (safetensors only; nothing is ever unpickled)::

    qscorer_config.json         QScorerConfig, written last
    head.safetensors            the ScoreHead
    tokenizer files             the tokenizer with its score tokens
    # weights_format == "full": the whole backbone, in transformers' layout
    config.json, model.safetensors (or model-0000x-of-0000y.safetensors + index)
    # weights_format == "trained_parts": only what training changed, on top of config.base_model
    score_tokens.safetensors    input_embeddings / output_embeddings, [K, hidden] each
    adapter_config.json, adapter_model.safetensors   peft LoRA adapter (when one was trained)
    trained_modules.safetensors   whole backbone tensors that were trained (e.g. the vision tower),
                                  by their names in the backbone model (when any were)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .backbones import backbone_class
from .config import CONFIG_NAME, QScorerConfig
from .head import ScoreHead
from .score_tokens import set_score_token_rows

HEAD_FILE = "head.safetensors"
SCORE_TOKENS_FILE = "score_tokens.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
TRAINED_MODULES_FILE = "trained_modules.safetensors"
BUNDLED_DEFAULT = Path(__file__).parent / "default_model"


def write_checkpoint(
    directory: str | os.PathLike,
    config: QScorerConfig,
    head: dict[str, torch.Tensor],
    tokenizer=None,
    *,
    backbone: nn.Module | None = None,
    score_token_rows: dict[str, torch.Tensor] | None = None,
    adapter: tuple[object, dict[str, torch.Tensor]] | None = None,
    trained_modules: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory in ``config.weights_format``; the one writer of the format.

    The files go to a temporary sibling directory that replaces ``directory`` only once complete,
    so an interrupted save never leaves a checkpoint that looks whole. Tensors may be on any device.

    Args:
        directory: the checkpoint directory to create or replace.
        config: written as ``qscorer_config.json``; its ``weights_format`` says which weights follow.
        head: the `ScoreHead`'s state dict.
        tokenizer: the tokenizer with its score tokens (``save_pretrained``), or ``None``.
        backbone: ``"full"`` only: the whole transformers model, written by its ``save_pretrained``.
        score_token_rows: ``"trained_parts"`` only: ``input_embeddings`` and ``output_embeddings``,
            ``[K, hidden]`` each.
        adapter: ``"trained_parts"`` only, optional: a peft ``LoraConfig`` and the adapter's tensors
            as ``peft.get_peft_model_state_dict`` names them (see `lora_adapter`).
        trained_modules: ``"trained_parts"`` only, optional: backbone tensors trained whole, by their
            names in the backbone's state dict.
    """
    if config.weights_format == "full":
        if backbone is None or score_token_rows is not None or adapter is not None or trained_modules is not None:
            raise ValueError("weights_format 'full' writes the whole backbone and nothing of the trained-parts form")
        if has_lora(backbone):
            raise ValueError(
                "the backbone carries a LoRA adapter: save weights_format='trained_parts', or merge it first"
            )
    else:
        if backbone is not None or score_token_rows is None:
            raise ValueError("weights_format 'trained_parts' writes the score-token rows, not the whole backbone")
        if not config.base_model:
            raise ValueError("weights_format='trained_parts' needs config.base_model, the model the parts apply to")
        config = dataclasses.replace(config, base_model=lasting_base(config.base_model, directory))

    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        if backbone is not None:
            backbone.save_pretrained(staging)
        else:
            save_file(_on_cpu(score_token_rows), staging / SCORE_TOKENS_FILE)
            if trained_modules:
                save_file(_on_cpu(trained_modules), staging / TRAINED_MODULES_FILE)
            if adapter is not None:
                adapter_config, adapter_state = adapter
                adapter_config.save_pretrained(staging)
                save_file(
                    {PEFT_KEY_PREFIX + k: v for k, v in _on_cpu(adapter_state).items()}, staging / ADAPTER_WEIGHTS_FILE
                )
        save_file(_on_cpu(head), staging / HEAD_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        config.to_json_file(staging / CONFIG_NAME)
        replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def lasting_base(base_model: str, checkpoint: str | os.PathLike) -> str:
    """``base_model`` as a trained-parts checkpoint written to ``checkpoint`` records it: a local
    folder by its absolute path (so the checkpoint loads from any working directory), a hub id as is.

    Raises `ValueError` for a base the checkpoint would outlive: one in the system's temporary folder
    (cleared by the OS, or deleted by whoever made it, e.g. a ``tempfile.TemporaryDirectory``) when
    the checkpoint goes elsewhere, or the checkpoint's own directory, which the save replaces.
    """
    local = Path(base_model).expanduser()
    if not local.exists():
        return base_model
    local, target = local.resolve(), Path(checkpoint).expanduser().resolve()
    temporary = Path(tempfile.gettempdir()).resolve()
    if local == target:
        raise ValueError(f"the checkpoint would replace its own base model {local}: save it to another directory")
    if local.is_relative_to(temporary) and not target.is_relative_to(temporary):
        raise ValueError(
            f"base_model {local} is in the temporary folder {temporary}, which is cleared, but the checkpoint "
            f"goes to {target} and would outlive it: save the base model somewhere lasting (e.g. beside the "
            "checkpoint) and build the scorer from there, or save weights_format='full'"
        )
    return str(local)


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


def lora_adapter(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None):
    """``(LoraConfig, tensors)`` of the LoRA adapter injected into ``model`` in peft's naming, or
    ``None`` without one; the tensors are taken from ``state_dict`` (``model``'s own names) if given,
    e.g. weights gathered from a distributed run, else from ``model``."""
    if not has_lora(model):
        return None
    from peft import get_peft_model_state_dict

    if len(model.peft_config) != 1:
        raise ValueError(f"exactly one adapter can be saved, the backbone has {sorted(model.peft_config)}")
    (adapter_name, adapter_config), *_ = model.peft_config.items()
    return adapter_config, get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)


def replace_directory(new: Path, target: Path) -> None:
    """Move the complete directory ``new`` to ``target``, replacing what was there; ``target`` is at
    every moment either the old or the new directory (or absent if there was none)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    """A local checkpoint directory for ``path``: the bundled default when ``None``, a local
    directory as is, otherwise a hub id downloaded with ``huggingface_hub``."""
    if path is None:
        return BUNDLED_DEFAULT
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"{local} is a file; a Q-Scorer checkpoint is a directory")
        return local
    if _looks_like_hub_id(str(path)):
        from huggingface_hub import snapshot_download

        local_only = _check_hub_source(str(path), "checkpoint")
        return Path(snapshot_download(str(path), local_files_only=local_only))
    raise FileNotFoundError(f"{path}: no such checkpoint directory")


def _looks_like_hub_id(name: str) -> bool:
    """``namespace/name`` or ``name``, never a path that only a local folder can be."""
    return (
        name.count("/") <= 1 and "\\" not in name and not name.startswith((".", "/", "~")) and "" not in name.split("/")
    )


def _check_hub_source(name: str, what: str) -> bool:
    """Before fetching ``name`` (a hub id that is no local folder) from the Hugging Face Hub: raise
    `FileNotFoundError` at once, rather than after the hub client's retries, when it can be neither
    downloaded (offline mode, or the hub unreachable) nor found in the local cache. Returns whether
    it must be read from the cache only (the hub unreachable, but the files cached)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str) or isinstance(
        try_to_load_from_cache(name, CONFIG_NAME), str
    )
    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    unreachable = "downloads are off (HF_HUB_OFFLINE=1)" if offline else _hub_unreachable(constants.ENDPOINT)
    if unreachable is None or cached:
        return unreachable is not None
    raise FileNotFoundError(
        f"{what} {name!r}: there is no such local folder ({Path(name).absolute()}), and as a Hugging Face Hub id "
        f"it is not in the local cache and {unreachable}; check the path, or connect to the network"
    )


def _hub_unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached (a 3 s connection attempt), or ``None`` if it can or a
    proxy stands between (then the hub client finds out)."""
    import socket
    from urllib.parse import urlsplit

    if any(
        os.environ.get(name)
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    ):
        return None
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as err:
        return f"the hub ({endpoint}) cannot be reached ({err.strerror or err})"
    return None


@dataclasses.dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` read: the parts of a Q-Scorer, and whether a LoRA adapter was merged
    into the backbone's weights on the way (its trained parts can then no longer be saved apart)."""

    config: QScorerConfig
    model: nn.Module
    tokenizer: object
    head: ScoreHead
    adapter_merged: bool
    # The backbone tensors the checkpoint held whole (``trained_modules.safetensors``), and for a
    # ``full`` checkpoint where it was read from (an absolute folder or a hub id).
    trained_module_names: tuple[str, ...] = ()
    whole_weights_source: str | None = None


def load_checkpoint(
    path: str | os.PathLike | None,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    merge_lora: bool = True,
) -> LoadedCheckpoint:
    """Read a checkpoint directory (on the CPU): its config, backbone, tokenizer and head, which
    `QScorer.from_pretrained` wires together."""
    from transformers import AutoTokenizer

    directory = resolve_checkpoint(path)
    config = QScorerConfig.from_json_file(directory / CONFIG_NAME)
    backbone_class(config.backbone_family)  # refuses an unknown family; imports (registers) a native one
    head_state = read_safetensors(directory / HEAD_FILE, "the score head")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(f"{directory}: cannot load the tokenizer files ({err})") from err

    adapter_merged, trained_module_names, whole_weights_source = False, (), None
    load_kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    if config.weights_format == "full":
        model = _load_backbone(directory, **load_kwargs)
        local = path is None or Path(path).expanduser().exists()
        whole_weights_source = str(directory.resolve()) if local else str(path)
    else:
        if not config.base_model:
            raise ValueError(f"{directory / CONFIG_NAME}: weights_format 'trained_parts' needs base_model")
        if not Path(config.base_model).expanduser().exists():
            if not _looks_like_hub_id(config.base_model):
                raise FileNotFoundError(
                    f"{directory / CONFIG_NAME}: its base_model {config.base_model} does not exist; "
                    "copy the base model there, or set base_model to where it is"
                )
            load_kwargs["local_files_only"] = _check_hub_source(
                config.base_model, f"{directory / CONFIG_NAME}: base_model"
            )
        model = _load_backbone(config.base_model, **load_kwargs)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        rows_shape = (config.num_score_tokens, model.get_input_embeddings().weight.shape[1])
        rows = read_safetensors(
            directory / SCORE_TOKENS_FILE,
            "the score-token embedding rows",
            expected_shapes={"input_embeddings": rows_shape, "output_embeddings": rows_shape},
        )
        set_score_token_rows(model, config.score_token_ids, rows)
        if (directory / TRAINED_MODULES_FILE).is_file():
            trained_module_names = _load_trained_modules(model, directory / TRAINED_MODULES_FILE)
        if (directory / ADAPTER_CONFIG_FILE).is_file():
            model = _load_adapter(model, directory, merge_lora)
            adapter_merged = merge_lora

    hidden_size = model.get_input_embeddings().weight.shape[1]
    head = ScoreHead.from_config(hidden_size, config)
    expected = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    check_tensors(head_state, expected, directory / HEAD_FILE)
    head.load_state_dict(head_state)
    return LoadedCheckpoint(config, model, tokenizer, head, adapter_merged, trained_module_names, whole_weights_source)


def _load_backbone(source: str | Path, **kwargs):
    """A transformers vision-language model from ``source``, refusing missing or mis-shaped weights."""
    from transformers import AutoModelForImageTextToText

    source_dir = Path(source)
    weights = source
    if source_dir.is_dir():
        weights = _check_backbone_files(source_dir)
    try:
        # Mismatched sizes are let through here only to be reported precisely below.
        model, info = AutoModelForImageTextToText.from_pretrained(
            source, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{source}: cannot load the backbone ({err})") from err
    for name, *shapes in info.get("mismatched_keys") or []:
        found, expected = (tuple(shape) for shape in shapes[:2])
        raise ValueError(f"{weights}: tensor {name!r} has shape {found}, expected {expected}")
    problems = {key: sorted(map(str, info.get(key) or []))[:5] for key in ("missing_keys", "unexpected_keys")}
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        raise ValueError(f"{weights}: backbone weights do not match its config.json: {problems}")
    return model


def _check_backbone_files(directory: Path) -> Path:
    """Check that the backbone's config and safetensors files are there and readable (a truncated
    file fails here, naming it); returns the weights file, or the directory if sharded."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'} not found: the backbone's config is missing")
    weight_files = [
        path
        for path in sorted(directory.glob("*.safetensors"))
        if path.name not in (HEAD_FILE, SCORE_TOKENS_FILE, ADAPTER_WEIGHTS_FILE, TRAINED_MODULES_FILE)
    ]
    if not weight_files:
        raise FileNotFoundError(f"{directory}: no backbone weights (model.safetensors) found")
    for path in weight_files:
        read_safetensors_shapes(path, "backbone weights")
    return weight_files[0] if len(weight_files) == 1 else directory


def _load_trained_modules(model: nn.Module, path: Path) -> tuple[str, ...]:
    """Overwrite backbone tensors with the trained ones saved in ``path`` (names as in
    ``model.state_dict()``), refusing names the model does not have and mis-shaped tensors; returns
    their names."""
    own = model.state_dict()
    shapes = read_safetensors_shapes(path, "the trained backbone modules")
    unknown = sorted(set(shapes) - set(own))
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:5]} are not in the backbone model")
    tensors = read_safetensors(path, "the trained backbone modules", {name: tuple(own[name].shape) for name in shapes})
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)
    return tuple(sorted(tensors))


def backbone_tensors(model: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The current values of ``model``'s tensors ``names`` (as named before any LoRA adapter was
    injected: peft moves a wrapped layer's own weights under ``base_layer``)."""
    state = model.state_dict()
    tensors = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        tensors[name] = state[name] if name in state else state[f"{module}.base_layer.{leaf}"]
    return tensors


# peft's on-disk adapter format prefixes parameter names as a `PeftModel` wrapping the model would.
PEFT_KEY_PREFIX = "base_model.model."


def has_lora(model: nn.Module) -> bool:
    """Whether peft adapter layers are injected into ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def _load_adapter(model: nn.Module, directory: Path, merge: bool) -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``model``; merge it into the base weights
    (and remove the adapter layers) when ``merge``. Refuses missing or mis-shaped adapter tensors."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    try:
        adapter_config = LoraConfig.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{directory / ADAPTER_CONFIG_FILE}: cannot read the LoRA adapter config ({err})") from err
    adapter_config.inference_mode = True
    inject_adapter_in_model(adapter_config, model)
    expected = {PEFT_KEY_PREFIX + k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    state = read_safetensors(directory / ADAPTER_WEIGHTS_FILE, "the LoRA adapter weights", expected)
    set_peft_model_state_dict(model, {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in state.items()})
    if merge:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent_name, _, child_name = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child_name, module.get_base_layer())
        del model.peft_config
    return model


def read_safetensors(
    path: Path, what: str, expected_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, torch.Tensor]:
    """Read a safetensors file, with errors that name the file and say what is wrong with it."""
    _require_file(path, what)
    try:
        with safe_open(path, framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} ({what}) is truncated or not a safetensors file: {err}") from err
    if expected_shapes is not None:
        check_tensors(tensors, expected_shapes, path)
    return tensors


def read_safetensors_shapes(path: Path, what: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the data; errors as `read_safetensors`."""
    _require_file(path, what)
    try:
        with safe_open(path, framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} ({what}) is truncated or not a safetensors file: {err}") from err


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint is missing {what}")


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming the file and the tensor."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
