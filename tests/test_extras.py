"""The core install scores and filters; a feature whose extra is missing says, in one line, which
extra to install. The missing packages are hidden from the import system here."""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

from qscorer_reward.cli import main
from qscorer_reward.extras import EXTRA_MODULES, MissingExtraError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = ("qscorer_reward", "integrations", "training")  # the folders the wheel maps into the package


@pytest.fixture
def without(monkeypatch):
    """``without(*packages, reimport=...)``: make ``packages`` impossible to import, as on an
    install without them (``sys.modules[name] = None``), and forget the modules ``reimport`` names
    (with their submodules) so that importing them runs their checks again."""

    def hide(*packages: str, reimport: tuple[str, ...] = ()) -> None:
        for name in list(sys.modules):
            if any(name == prefix or name.startswith(prefix + ".") for prefix in (*packages, *reimport)):
                monkeypatch.delitem(sys.modules, name)
        for package in packages:
            monkeypatch.setitem(sys.modules, package, None)

    return hide


def test_the_trl_integration_without_trl_names_its_extra(without):
    without("trl", reimport=("qscorer_reward.integrations.trl",))
    with pytest.raises(MissingExtraError, match=r'integrations.trl needs trl: pip install "qscorer-reward\[trl\]"$'):
        importlib.import_module("qscorer_reward.integrations.trl")


def test_pairwise_training_without_trl_names_its_extra(without):
    without("trl", reimport=("qscorer_reward.training.pairwise",))
    with pytest.raises(ImportError, match=r'training.pairwise needs .*: pip install "qscorer-reward\[trl\]"'):
        importlib.import_module("qscorer_reward.training.pairwise")


def test_the_diffusers_integration_without_diffusers_names_its_extra(without):
    without("diffusers", reimport=("qscorer_reward.integrations.diffusers", "qscorer_reward.testing.pipelines"))
    with pytest.raises(ImportError, match=r'needs diffusers: pip install "qscorer-reward\[diffusers\]"'):
        importlib.import_module("qscorer_reward.integrations.diffusers")
    with pytest.raises(ImportError, match=r'pipelines needs diffusers: pip install "qscorer-reward\[diffusers\]"'):
        importlib.import_module("qscorer_reward.testing.pipelines")


@pytest.mark.parametrize("command", [["serve"], ["score", "photos", "--engine", "ray"]])
def test_the_service_and_the_ray_engine_without_ray_say_so_in_one_line(without, capsys, command):
    without("ray", reimport=("qscorer_reward.serving.app", "qscorer_reward.serving.ray_engine"))
    assert main(command) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: qscorer_reward.serving.") and 'pip install "qscorer-reward[serve]"' in error
    assert error.count("\n") == 1


def test_the_reward_service_without_ray_names_its_extra(without):
    without("ray", reimport=("qscorer_reward.serving.app",))
    with pytest.raises(MissingExtraError, match=r'serving.app needs .*: pip install "qscorer-reward\[serve\]"$'):
        importlib.import_module("qscorer_reward.serving.app")


@pytest.mark.parametrize("command", [["train", "--config", "recipe.yaml"], ["eval", "--manifest", "scores.csv"]])
def test_train_and_eval_without_the_train_extra_say_so_in_one_line(without, capsys, command):
    without("scipy", reimport=("qscorer_reward.training.trainer", "qscorer_reward.training.evaluation"))
    assert main(command) == 2
    error = capsys.readouterr().err
    extra = 'qscorer_reward.training needs scipy: pip install "qscorer-reward[train]"'
    assert error == f"error: {extra} (--debug shows the traceback)\n"


# Import name -> distribution, where they differ.
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image", "huggingface_hub": "huggingface-hub"}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_every_import_of_an_installed_module_is_a_dependency_or_an_extra_it_asks_for():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = requirement_names(project["dependencies"])
    extras = {name: requirement_names(deps) for name, deps in project["optional-dependencies"].items()}
    for extra, modules in EXTRA_MODULES.items():
        assert {DISTRIBUTIONS.get(module, module) for module in modules} <= extras[extra]
    problems = []
    for path in sorted(p for folder in INSTALLED for p in (ROOT / folder).rglob("*.py")):
        source = path.read_text()
        package_init = path.parent / "__init__.py"
        guards = set(re.findall(r'(?:require_extra|missing_extra)\("(\w+)"', source))
        if path.parent.name == "diffusers":  # the subpackage's __init__ checks for all of its modules
            guards |= set(re.findall(r'missing_extra\("(\w+)"', package_init.read_text()))
        allowed = core | {dist for extra in guards for dist in extras[extra]}
        for node in ast.walk(ast.parse(source)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "qscorer_reward":
                    continue
                if DISTRIBUTIONS.get(top, top) not in allowed:
                    problems.append(f"{path.relative_to(ROOT)} imports {top}")
    assert not problems, problems
