"""The optional extras, and the `ImportError` that names the one to install.

The core install (``pip install qscorer-reward``) scores and filters. A module that needs more
says so when it is imported, in one line that names what to install::

    ImportError: qscorer_reward.integrations.trl needs trl: pip install "qscorer-reward[trl]"

A module whose own imports need the extra wraps them (``try: import trl`` / ``except
ModuleNotFoundError as err: raise missing_extra("trl", __name__) from err``); one that uses the
extra only later calls `require_extra` after its imports.
"""

from __future__ import annotations

import importlib.util

# The modules the package imports from each extra of pyproject.toml's optional dependencies.
EXTRA_MODULES = {
    "diffusers": ("diffusers",),
    "trl": ("trl", "datasets"),
    "train": ("scipy",),
    "serve": ("ray", "starlette", "pyarrow"),
    "dev": ("selenium",),  # the browser that tests the HTML report (`qscorer_reward.testing.browser`)
}


class MissingExtraError(ImportError):
    """A feature's optional dependencies are not installed; the message names the extra."""


def missing_extra(extra: str, feature: str, missing: list[str] | None = None) -> MissingExtraError:
    """The error for ``feature`` lacking ``extra`` (or the ``missing`` modules of it)."""
    names = ", ".join(missing or EXTRA_MODULES[extra])
    return MissingExtraError(f'{feature} needs {names}: pip install "qscorer-reward[{extra}]"')


def require_extra(extra: str, feature: str) -> None:
    """Raise `missing_extra` if any module of ``extra`` cannot be imported."""
    missing = [name for name in EXTRA_MODULES[extra] if not _importable(name)]
    if missing:
        raise missing_extra(extra, feature, missing)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a blocked or half-imported module
        return False
