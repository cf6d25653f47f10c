"""The documentation works as written (issue 21, items 20 and 22).

Every Python block of README.md, docs/*.md and recipes/qscorer_tiny/README.md runs here, in a fresh
namespace, from an empty working directory, offline, on the CPU. A block that needs something it
does not make says so in an HTML comment on the line before it (visible in the Markdown source,
not in the rendered page):

- ``<!-- docs-test: skip (REASON) -->``: not run. It must also be listed in `SKIPPED` below, and
  pytest reports it as skipped with REASON (``pytest -rs``), so that no block is left out unseen.
- ``<!-- docs-test: given NAME, NAME, ... -->``: run with each NAME provided first: a variable of
  `VARIABLES` (``pipe``, ``scorer``, ...; tiny models), or a file or folder of `FILES` made in the
  working directory under that very name (``path/to/checkpoint``, ``recipe.yaml``, hub-style names
  such as ``2kxx/Qscorer_lora_5_1``: a tiny model of the same layout). The block itself is unchanged.
- ``...; cuda as cpu`` after the names: the string ``"cuda"`` in the block is read as ``"cpu"``,
  for blocks written for a GPU.

A block without a comment must run as it stands. The other tests check documented facts against
the code: the options of every subcommand, the benchmark scripts, the paths of the recipes.
"""

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "recipes" / "qscorer_tiny" / "README.md"]
MARKER = re.compile(r"<!-- docs-test: (.*?) -->")

# The blocks that are not run: (document, first line of the block).
SKIPPED = {
    ("docs/serving.md", "from qscorer_reward.serving import RemoteQScorer"),
    ("docs/serving.md", "from qscorer_reward.integrations.trl import QScorerRewardFunc"),
    ("docs/serving.md", "from concurrent.futures import ThreadPoolExecutor"),
    ("docs/trl.md", "import torch"),  # the GRPOTrainer outline with sd-turbo from the hub
}


def python_blocks():
    """``(document, line, marker or None, code)`` of every Python block; a marker not followed by
    a Python block is an error."""
    blocks = []
    for document in DOCUMENTS:
        lines = document.read_text().splitlines()
        relative = document.relative_to(ROOT).as_posix()
        for index, line in enumerate(lines):
            marker = MARKER.fullmatch(line.strip())
            if marker and not lines[index + 1].startswith("```python"):
                raise AssertionError(f"{relative}:{index + 1}: a docs-test comment not right before a Python block")
            if line.startswith("```python"):
                end = next(j for j in range(index + 1, len(lines)) if lines[j].startswith("```"))
                previous = MARKER.fullmatch(lines[index - 1].strip()) if index else None
                code = "\n".join(lines[index + 1 : end]) + "\n"
                blocks.append((relative, index + 1, previous[1] if previous else None, code))
    return blocks


BLOCKS = python_blocks()


# -------------------------------------------------------------------------------- what blocks need


def _tiny_scorer():
    from qscorer_reward.testing import tiny_scorer

    return tiny_scorer(max_pixels=56 * 56)


def _pipe():
    from qscorer_reward.testing.pipelines import tiny_pipeline

    return tiny_pipeline("sd")


def _images(count=2):
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _pairs():
    from datasets import DatasetDict
    from tiny_checkpoints import pairs

    return DatasetDict({"train": pairs(8), "test": pairs(4)})


def _gate():
    from qscorer_reward.integrations.diffusers import QualityGate

    return QualityGate(_tiny_scorer(), threshold=2.8, gate_step_ratio=0.5)


# name -> its value (made fresh for each block)
VARIABLES = {
    "pipe": _pipe,
    "prompts": lambda: ["a red car", "a lake"],
    "scorer": _tiny_scorer,
    "images": _images,
    "gate": _gate,
    "prompt_metadata": lambda: [{}, {}],
    "sample_batch": lambda: lambda: (_images(4), ["a red car"] * 4, [{} for _ in range(4)]),
    "num_batches": lambda: 2,
    "pairs": _pairs,
}


def _checkpoint(path: Path):
    _tiny_scorer().save_pretrained(path)


def _trained_final(path: Path):
    from tiny_checkpoints import trained_final

    shutil.move(trained_final(path.parent / ".train"), path)


def _recipe(path: Path):
    from tiny_checkpoints import tiny_training_config

    tiny_training_config(path.parent / ".recipe").save(path)


def _release(path: Path):
    """Both folders of the paper's release, tiny, under their hub names."""
    from qscorer_reward.testing.official import write_tiny_release

    work = Path.cwd()
    if not (work / "2kxx" / "Qscorer_lora_5_1").exists():
        lora, base = write_tiny_release(work / ".release")
        (work / "2kxx").mkdir(exist_ok=True)
        (work / "MAGAer13").mkdir(exist_ok=True)
        lora.rename(work / "2kxx" / "Qscorer_lora_5_1")
        base.rename(work / "MAGAer13" / "mplug-owl2-llama2-7b")


def _converted(path: Path):
    from qscorer_reward.official_checkpoint import convert_official

    _release(path)
    convert_official("2kxx/Qscorer_lora_5_1", "MAGAer13/mplug-owl2-llama2-7b", path)


def _sd_pipeline(path: Path):
    _pipe().save_pretrained(path)


def _reward_lora(path: Path):
    from qscorer_reward.integrations.diffusers import RewardFinetuneConfig, RewardFinetuner

    config = RewardFinetuneConfig(
        num_inference_steps=2, truncation_steps=1, resolution=32, lora_rank=4, max_train_steps=1,
        mixed_precision="no", train_prompts=["a red car"], output_dir=str(path),
    )  # fmt: skip
    RewardFinetuner(_pipe(), _tiny_scorer(), config).train()


# name -> a function making it in the working directory, at that path
FILES = {
    "path/to/checkpoint": _checkpoint,
    "path/to/qscorer": _trained_final,  # what `qscorer train` writes: trained parts with an adapter
    "recipe.yaml": _recipe,
    "2kxx/Qscorer_lora_5_1": _release,
    "MAGAer13/mplug-owl2-llama2-7b": _release,
    "qscorer-mplug-owl2": _converted,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _sd_pipeline,
    "reward-finetune-sd15": _reward_lora,
}


def parse(marker: str | None) -> tuple[list[str], bool]:
    """The names a ``given`` marker lists, and whether it reads "cuda" as "cpu"."""
    if marker is None:
        return [], False
    given, _, option = marker.partition(";")
    assert given.startswith("given "), f"unknown docs-test comment: {marker!r}"
    assert option.strip() in ("", "cuda as cpu"), f"unknown docs-test option: {option!r}"
    return [name.strip() for name in given.removeprefix("given ").split(",")], option.strip() == "cuda as cpu"


# ------------------------------------------------------------------------------------ the blocks


def test_the_skipped_blocks_are_the_listed_ones():
    skips = [(document, code, marker) for document, _, marker, code in BLOCKS if (marker or "").startswith("skip")]
    assert {(document, code.splitlines()[0]) for document, code, _ in skips} == SKIPPED
    assert all(re.fullmatch(r"skip \(.+\)", marker) for _, _, marker in skips)  # each with its reason


@pytest.mark.parametrize(("document", "line", "marker", "code"), BLOCKS, ids=[f"{d}:{n}" for d, n, _, _ in BLOCKS])
def test_the_python_block_runs(document, line, marker, code, tmp_path, monkeypatch):
    if marker and marker.startswith("skip"):
        pytest.skip(f"{document}:{line}: {marker}")
    names, cuda_as_cpu = parse(marker)
    unknown = [name for name in names if name not in VARIABLES and name not in FILES]
    assert not unknown, f"{document}:{line} needs {unknown}, which this test does not provide"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models
    try:
        namespace = {"__name__": "__docs__"}
        for name in names:
            if name in VARIABLES:
                namespace[name] = VARIABLES[name]()
            elif not (tmp_path / name).exists():
                (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
                FILES[name](tmp_path / name)
        if cuda_as_cpu:
            code = code.replace('"cuda"', '"cpu"')
        exec(compile(code, f"{document}:{line}", "exec"), namespace)
        check = CHECKS.get((document, code.splitlines()[0]))
        if check:
            check(namespace)
    finally:
        torch.set_num_threads(threads)


def _gradients_reach_the_pixels(namespace):
    assert namespace["images"].grad is not None and namespace["images"].grad.abs().sum() > 0


def _the_pairwise_checkpoint_loads_as_trained(namespace):
    from qscorer_reward import QScorer

    images = _images(3)
    with torch.no_grad():
        trained = namespace["trainer"].model.eval()(images)
    torch.testing.assert_close(QScorer.from_pretrained("qscorer-prefs")(images), trained, atol=1e-5, rtol=0)


# What a block says it does, checked after it ran: (document, first line of the block) -> check.
CHECKS = {
    ("README.md", "import torch"): _gradients_reach_the_pixels,
    ("docs/trl.md", "from peft import LoraConfig"): _the_pairwise_checkpoint_loads_as_trained,
}


# ------------------------------------------------------------------------------ documented facts


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end >= 0 else None]


def _subcommands():
    from qscorer_reward.cli import build_parser

    parser = build_parser()
    return next(action for action in parser._actions if action.choices and "score" in action.choices).choices


def test_docs_cli_names_every_option_of_every_subcommand():
    """Item 20: docs/cli.md left out five options of `eval`."""
    cli = (ROOT / "docs" / "cli.md").read_text()
    serving = (ROOT / "docs" / "serving.md").read_text()
    missing = []
    for name, command in _subcommands().items():
        heading = "## `qscorer train` and `qscorer eval`" if name in ("train", "eval") else f"## `qscorer {name}`"
        text = _section(serving, "## Start a server") if name == "serve" else _section(cli, heading)
        for action in command._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help", "--debug") and not re.search(rf"`[^`]*{option}\b", text):
                    missing.append(f"{name} {option}")
    assert not missing, f"not in docs/cli.md (serve: docs/serving.md): {missing}"
    assert "`--debug` (any\nsubcommand)" in cli  # documented once for all


def test_docs_cli_synopsis_shows_required_options_as_required():
    """Item 20: the synopsis showed `eval --checkpoint` as required; it defaults to the bundled model."""
    synopsis = (ROOT / "docs" / "cli.md").read_text().split("```")[1]
    for name, command in _subcommands().items():
        lines = [line for line in synopsis.splitlines() if line.startswith(f"qscorer {name} ")]
        assert lines, f"qscorer {name} has no synopsis line in docs/cli.md"
        for line in lines:
            for action in command._actions:
                for option in action.option_strings:
                    found = re.search(rf"(?<![\w-]){option}(?![\w-])", line)
                    if not found:
                        continue
                    before, after = line[: found.start()], line[found.end() :].split()
                    optional = before.count("[") > before.count("]") or before.count("(") > before.count(")")
                    # An optional option with a literal value picks another form of the command (--engine ray).
                    form = bool(action.choices and after and after[0] in action.choices)
                    assert optional != action.required or form, f"docs/cli.md: {option} is shown wrongly in {line!r}"


def test_docs_benchmarks_names_every_script():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    scripts = sorted(path.name for path in (ROOT / "benchmarks").glob("bench_*.py"))
    table = text[: text.index("The first three share")]
    assert [name for name in scripts if f"`{name}`" not in table] == []
    words = {5: "Five", 6: "Six", 7: "Seven", 8: "Eight", 9: "Nine", 10: "Ten"}
    assert text.split("\n\n")[1].startswith(f"{words[len(scripts)]} scripts in `benchmarks/`")


def test_documented_training_paths_are_the_recipes():
    """Item 20: README and docs/cli.md named runs/koniq/best and /data/koniq10k, the recipe
    runs/qscorer-qwen2.5-vl-7b-koniq and /data/iqa/koniq10k."""
    recipes = [yaml.safe_load(path.read_text()) for path in (ROOT / "training" / "configs").glob("*.yaml")]
    outputs = {recipe["output_dir"] for recipe in recipes if "output_dir" in recipe and "train_datasets" in recipe}
    datasets = {entry["path"] for recipe in recipes for entry in recipe.get("train_datasets", [])}
    for document in DOCUMENTS:
        text = document.read_text()
        for run in re.findall(r"runs/[\w.\-]*(?:koniq|mixed)[\w.\-]*", text):
            assert run in outputs, f"{document.name}: {run} is no recipe's output_dir ({sorted(outputs)})"
        for data in re.findall(r"/data/[\w/.\-]*(?:koniq|spaq|kadid)[\w.\-]*", text):
            assert data in datasets, f"{document.name}: {data} is no recipe's dataset path ({sorted(datasets)})"


def test_the_trackers_the_recipes_report_to_are_installed_by_the_train_extra():
    """Item 20: `report_to: tensorboard` warned on every run while tensorboard was not declared."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    declared = {re.split(r"[<>=\[ ]", requirement)[0] for requirement in extra}
    for path in (ROOT / "training" / "configs").glob("*.yaml"):
        for tracker in yaml.safe_load(path.read_text()).get("report_to") or []:
            assert tracker in declared, f"{path.name} reports to {tracker}, which [train] does not install"
