"""Run examples as scripts in one fresh interpreter, each from its own empty working directory, and
write what each did to ``RESULTS/NAME.json``: ``{"status": exit status, "stdout": ..., "stderr": ...}``.

    python tests/run_examples.py RESULTS NAME.py:ARG,ARG,... [NAME.py:...]

Used by ``tests/test_examples.py``. Output is caught at the file-descriptor level, so it includes
what libraries' logging handlers write; every warning is shown each time it is raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@contextlib.contextmanager
def captured(stdout_path: Path, stderr_path: Path):
    """File descriptors 1 and 2 (and Python's streams) redirected into the two files."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run(name: str, args: list[str], workdir: Path, results: Path) -> None:
    workdir.mkdir(parents=True)
    os.chdir(workdir)
    sys.argv = [str(EXAMPLES / name), *args]
    threads = torch.get_num_threads()
    status = 0
    with captured(results / f"{name}.stdout", results / f"{name}.stderr"), warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            runpy.run_path(str(EXAMPLES / name), run_name="__main__")
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            torch.set_num_threads(threads)
    record = {"status": status, "workdir": str(workdir)}
    for stream in ("stdout", "stderr"):
        path = results / f"{name}.{stream}"
        record[stream] = path.read_text(errors="replace")
        path.unlink()
    (results / f"{name}.json").write_text(json.dumps(record))


def main() -> None:
    results = Path(sys.argv[1]).resolve()
    results.mkdir(parents=True, exist_ok=True)
    for spec in sys.argv[2:]:
        name, _, args = spec.partition(":")
        torch.manual_seed(0)
        run(name, [arg for arg in args.split(",") if arg], Path(tempfile.mkdtemp(dir=results)) / "cwd", results)


if __name__ == "__main__":
    main()
