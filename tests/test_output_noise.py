"""The package's own runs print none of the library messages they used to trigger on every run
(issue 21 item 21): `qscorer train` here; `qscorer score` in test_cli_reliability.py (the quick
start), the examples in test_examples.py. Warnings are recorded as raised (pytest's configuration
ignores FutureWarnings)."""

import re
import warnings

from tiny_checkpoints import tiny_training_config

from qscorer_reward.cli import main

NOISE = re.compile(
    r"Loading weights|truncated because|requires torchvision \(not installed\)"
    r"|`gradient_checkpointing\w*` is deprecated"
)


def test_qscorer_train_prints_no_library_noise(tmp_path, capfd):
    config = tiny_training_config(tmp_path)
    config.gradient_checkpointing = True  # the recipes' default: the checkpointing calls run
    config.save(tmp_path / "tiny.yaml")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--config", str(tmp_path / "tiny.yaml")]) == 0
    stderr = capfd.readouterr().err
    assert not [line for line in stderr.splitlines() if NOISE.search(line)], stderr[-2000:]
    assert not [str(w.message) for w in caught if NOISE.search(str(w.message))]
    assert (tmp_path / "run" / "final" / "qscorer_config.json").is_file()
    # stderr is not a terminal here: no progress bar's carriage returns, a plain line per logging step
    assert "\r" not in stderr
    assert re.search(rf"^step {config.logging_steps}/{config.max_steps}: loss \d", stderr, re.MULTILINE), stderr
