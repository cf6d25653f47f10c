"""The command line under what real folders, disks and users do: a locked output, file names that
are not UTF-8, what is skipped and why, one-line errors with exit status 2, progress only on a
terminal, and an instant ``--help``."""

import csv
import fcntl
import io
import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qscorer_reward.cli import build_parser, main
from qscorer_reward.scoring_job import ROW_FILE_ERRORS, _pillow_suffixes, read_rows
from qscorer_reward.testing import tiny_base_model, tiny_scorer

UNDECODABLE = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes of a name that is not UTF-8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model") / "tiny"
    tiny_scorer().save_pretrained(directory)
    return directory


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    return path


def _run(args, capsys):
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _python(code: str, *args, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)  # fmt: skip


# ---------------------------------------------------------------------------------------- the lock

HOLDER = """
import sys
from pathlib import Path
from qscorer_reward.output_lock import locked_output
with locked_output(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held_output(tmp_path):
    """An output whose lock another process holds, as a run that is writing it does."""
    output = tmp_path / "scores.csv"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    yield output, holder
    if holder.poll() is None:
        holder.kill()
    holder.wait()


def test_a_second_run_on_the_same_output_is_refused_at_once_naming_the_holder(held_output, tmp_path, capsys):
    output, holder = held_output
    image = _image(tmp_path / "a.png")
    output.write_text("path,score,error\n")
    # --model names nothing: refused before any model is loaded
    for extra in (["--overwrite"], ["--resume"], []):
        status, out, err = _run(["score", image, "--output", output, "--model", tmp_path / "none", *extra], capsys)
        assert status == 2
        assert f"{output} is being written by another qscorer run (process {holder.pid} on " in err
        assert "wait for it to end" in err and len(err.splitlines()) == 1
    assert output.read_text() == "path,score,error\n"


def test_the_lock_dies_with_its_run_and_is_removed_after_a_normal_run(held_output, model_dir, tmp_path, capsys):
    output, holder = held_output
    image = _image(tmp_path / "a.png")
    holder.send_signal(signal.SIGKILL)  # a run killed -9 holds nothing
    holder.wait()
    status, _, err = _run(["score", image, "--output", output, "--model", model_dir], capsys)
    assert status == 0, err
    assert [Path(row.path).name for row in read_rows(output)] == ["a.png"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("scores")) == ["scores.csv"]


# ---------------------------------------------------------------------------------------- file names


def test_names_that_are_not_utf8_are_written_losslessly_and_resumed(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    _image(folder / UNDECODABLE)
    _image(folder / "plain.png", seed=1)
    undecodable = str(folder / UNDECODABLE)
    for suffix in ("csv", "jsonl"):
        output = tmp_path / f"scores.{suffix}"
        status, _, err = _run(["score", folder, "--model", model_dir, "--output", output], capsys)
        assert status == 0, err
        rows = read_rows(output)
        assert [row.path for row in rows] == [undecodable, str(folder / "plain.png")]
        assert os.fsencode(rows[0].path).endswith(b"caf\xe9.png")  # the very bytes of the name
        status, _, err = _run(["score", folder, "--model", model_dir, "--output", output, "--resume"], capsys)
        assert status == 0 and "scored 0 image(s), 0 failed; 2 kept" in err
    data = (tmp_path / "scores.csv").read_bytes()
    assert b"/caf\xe9.png," in data  # CSV: the name's own bytes
    text = (tmp_path / "scores.jsonl").read_bytes().decode("utf-8")  # JSONL: valid UTF-8 ...
    assert '/caf\\udce9.png"' in text  # ... with the byte as Python's surrogate escape
    # the table and filter's report show it readably; filter places it from the CSV
    status, out, _ = _run(["score", folder / UNDECODABLE, "--model", model_dir], capsys)
    assert status == 0 and "caf\\xe9.png" in out
    dest = tmp_path / "kept"
    status, out, err = _run(["filter", folder, "--min-score", "1", "--dest", dest, "--scores", tmp_path / "scores.csv"],
                            capsys)  # fmt: skip
    assert status == 0, err
    assert (dest / UNDECODABLE).read_bytes() == (folder / UNDECODABLE).read_bytes()
    assert "caf\\xe9.png" in out


def test_csv_to_stdout_keeps_the_name_bytes(model_dir, tmp_path, capfdbinary):
    _image(tmp_path / UNDECODABLE)
    assert main(["score", str(tmp_path / UNDECODABLE), "--model", str(model_dir), "--format", "csv"]) == 0
    out = capfdbinary.readouterr().out
    rows = list(csv.DictReader(io.StringIO(out.decode("utf-8", ROW_FILE_ERRORS), newline="")))
    assert [row["path"] for row in rows] == [str(tmp_path / UNDECODABLE)]


def test_the_table_has_a_header_and_escapes_control_characters(model_dir, tmp_path, capsys):
    _image(tmp_path / "new\nline.png")
    _image(tmp_path / "esc\x1b[31m.png", seed=1)
    status, out, _ = _run(["score", tmp_path, "--model", model_dir, "--format", "table"], capsys)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["score", "path"]
    assert len(lines) == 3  # one line per file
    assert lines[1].endswith("esc\\x1b[31m.png") and lines[2].endswith("new\\nline.png")
    assert 1.0 <= float(lines[1].split()[0]) <= 5.0


# ---------------------------------------------------------------------------------------- skipped files


def _world_accessible_folder() -> Path:
    """A folder under the system temp folder that any user can enter (for the unprivileged runs)."""
    folder = Path(tempfile.mkdtemp(prefix="qscorer-permissions-"))
    folder.chmod(0o755)
    return folder


def _without_permission_override() -> None:
    """In the child, before it runs Python: drop the capabilities that let root ignore file
    permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set, so that the program
    it runs has them no more (Linux ``prctl(PR_CAPBSET_DROP)``)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            os._exit(97)


def _unprivileged(code: str, *args) -> subprocess.CompletedProcess:
    """Run Python ``code`` so that file permissions apply to it: as is, or, when the tests run as
    root, without root's power to override them."""
    if os.geteuid() != 0:
        return _python(code, *args)
    result = _python(code, *args, preexec_fn=_without_permission_override)
    if result.returncode == 97:
        pytest.skip("cannot drop root's permission override here to test permissions")
    return result


@pytest.fixture
def awkward_folder():
    """Good images, an unreadable subfolder, a broken symbolic link, a link to a folder, and a HEIC."""
    if ".heic" in _pillow_suffixes():
        pytest.skip("this Pillow opens .heic files (pillow-heif is installed)")
    root = _world_accessible_folder()
    _image(root / "good.png")
    _image(root / "locked" / "hidden.png")
    (root / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "broken.png").symlink_to(root / "gone.png")
    (root / "elsewhere").symlink_to(root / "locked", target_is_directory=True)
    (root / "locked").chmod(0)
    yield root
    (root / "locked").chmod(0o755)
    shutil.rmtree(root)


SEARCH = """
import json, sys
from qscorer_reward.scoring_job import search_images
found = search_images(sys.argv[1:])
print(json.dumps({"files": [str(f) for f, _ in found.files], "skipped": [[r.path, r.error] for r in found.skipped]}))
"""


def test_what_the_search_skips_is_counted_and_listed(awkward_folder, tmp_path, capsys):
    result = _unprivileged(SEARCH, awkward_folder)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["files"] == [str(awkward_folder / "good.png")]
    skipped = dict(found["skipped"])
    assert skipped[str(awkward_folder / "broken.png")].startswith("skipped: broken symbolic link")
    assert skipped[str(awkward_folder / "elsewhere")] == "skipped: symbolic link to a folder, not followed"
    assert skipped[str(awkward_folder / "locked")] == "skipped: cannot list this folder (Permission denied)"
    assert "pillow-heif" in skipped[str(awkward_folder / "photo.heic")]


def test_score_reports_skipped_files_in_the_summary_and_the_output(awkward_folder, model_dir, tmp_path, capsys):
    output = tmp_path / "scores.csv"
    status, _, err = _run(["score", awkward_folder, "--model", model_dir, "--output", output], capsys)
    assert status == 1  # something the user asked for was not scored
    if os.geteuid() == 0:  # root reads the locked folder
        assert "scored 2 image(s), 0 failed, 3 skipped" in err
    else:
        assert "scored 1 image(s), 0 failed, 4 skipped" in err
    assert f"skipped {awkward_folder / 'photo.heic'}: this Pillow cannot open .heic files" in err
    rows = {Path(row.path).name: row for row in read_rows(output)}
    assert rows["broken.png"].score is None and rows["broken.png"].error.startswith("skipped: broken symbolic link")
    assert rows["photo.heic"].skipped and rows["elsewhere"].skipped and not rows["good.png"].skipped
    status, _, err = _run(["score", awkward_folder, "--model", model_dir, "--output", output, "--resume"], capsys)
    assert "scored 0 image(s), 0 failed" in err and "kept" in err


UNSEARCHABLE = """
import sys
from qscorer_reward.cli import main
sys.exit(main(["score", sys.argv[1]]))
"""


def test_an_unsearchable_folder_is_one_line_and_status_2(awkward_folder):
    result = _unprivileged(UNSEARCHABLE, awkward_folder / "locked")
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: cannot search {awkward_folder / 'locked'}: Permission denied; check the " \
                            "folder's permissions (--debug shows the traceback)\n"  # fmt: skip


# ---------------------------------------------------------------------------------------- errors


def _one_line_error(status, out, err):
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is there")
def test_a_device_that_is_not_there(tmp_path, capsys):
    status, out, err = _run(["score", _image(tmp_path / "a.png"), "--device", "cuda"], capsys)
    _one_line_error(status, out, err)
    assert "--device cuda: no cuda device is available" in err and "use --device cpu" in err


def test_a_model_that_is_not_there(tmp_path, capsys):
    status, out, err = _run(["score", _image(tmp_path / "a.png"), "--model", tmp_path / "nonexistent"], capsys)
    _one_line_error(status, out, err)
    assert f"cannot load the model {tmp_path / 'nonexistent'}" in err
    with pytest.raises(Exception, match="no such checkpoint directory"):  # --debug: the traceback
        main(["score", str(tmp_path / "a.png"), "--model", str(tmp_path / "nonexistent"), "--debug"])


def test_eval_on_a_folder_that_is_not_there(tmp_path, capsys):
    status, out, err = _run(["eval", "--dataset", "koniq10k", "--root", tmp_path / "nonexistent"], capsys)
    _one_line_error(status, out, err)
    assert str(tmp_path / "nonexistent") in err


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if result.returncode:
        pytest.skip(f"as root, a read-only folder needs a read-only mount: {result.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_destination_is_refused_before_anything_is_done(read_only_folder, tmp_path, capsys):
    source = _image(tmp_path / "a.png")
    for dest in (read_only_folder, read_only_folder / "new"):
        status, out, err = _run(["filter", source, "--min-score", "1", "--dest", dest, "--model", tmp_path / "x"],
                                capsys)  # fmt: skip
        _one_line_error(status, out, err)
        assert f"--dest {dest}: cannot write in {read_only_folder}" in err
    status, out, err = _run(["score", source, "--output", read_only_folder / "scores.csv"], capsys)
    _one_line_error(status, out, err)
    assert f"cannot write --output {read_only_folder / 'scores.csv'}" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_min_score_must_be_finite(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["filter", str(tmp_path), f"--min-score={value}", "--dest", str(tmp_path / "kept")])
    assert exit_.value.code == 2
    assert "--min-score: must be a finite number" in capsys.readouterr().err


def test_min_score_outside_the_score_range_is_warned_about(model_dir, tmp_path, capsys):
    source = _image(tmp_path / "a.png")
    status, _, err = _run(["filter", source, "--min-score", "7", "--dest", tmp_path / "kept", "--model", model_dir],
                          capsys)  # fmt: skip
    assert status == 0 and "--min-score 7 is above the model's score range [1, 5]: no image can pass" in err
    status, _, err = _run(["filter", source, "--min-score", "0", "--dest", tmp_path / "kept", "--model", model_dir,
                           "--dry-run"], capsys)  # fmt: skip
    assert "--min-score 0 is at or below the model's score range [1, 5]: every scored image passes" in err


# ---------------------------------------------------------------------------------------- progress


def _run_on_a_terminal(args) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; returns the status and what the terminal got."""
    main_fd, terminal_fd = pty.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    command = [sys.executable, "-m", "qscorer_reward.cli", *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=terminal_fd,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    os.close(terminal_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the terminal's other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    return process.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_the_progress_bar_shows_on_a_terminal_only_and_quiet_hides_it(model_dir, tmp_path, capsys):
    image = _image(tmp_path / "a.png")
    status, err = _run_on_a_terminal(["score", image, "--model", model_dir])
    assert status == 0 and "1/1" in err and "img/s" in err
    status, err = _run_on_a_terminal(["score", image, "--model", model_dir, "--quiet"])
    assert status == 0 and "img/s" not in err and "model:" not in err and "scored 1 image(s)" in err
    status, _, err = _run(["score", image, "--model", model_dir], capsys)  # stderr is no terminal here
    assert status == 0 and "\r" not in err and "img/s" not in err


def test_no_loading_bar_from_transformers(tmp_path, capsys):
    """eval on a trained-parts checkpoint loads its base model through transformers."""
    base, tokenizer = tiny_base_model()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    from qscorer_reward import QScorer

    QScorer.from_base_model(tmp_path / "base").save_pretrained(tmp_path / "parts", weights_format="trained_parts")
    images = [_image(tmp_path / f"{index}.png", seed=index) for index in range(3)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,mos\n" + "".join(f"{path},{2 + index}\n" for index, path in enumerate(images)))
    capsys.readouterr()
    status, _, err = _run(["eval", "--checkpoint", tmp_path / "parts", "--manifest", manifest,
                           "--output", tmp_path / "report.json"], capsys)  # fmt: skip
    assert status == 0, err
    assert "Loading weights" not in err and "%|" not in err


# ---------------------------------------------------------------------------------------- help

HELP = """
import sys
from qscorer_reward.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
heavy = sorted(name for name in ("torch", "transformers", "accelerate", "diffusers") if name in sys.modules)
print("HEAVY", heavy, code, file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["score", "--help"], ["filter", "--help"], ["eval", "--help"], ["score"],
     ["filter", "x", "--min-score", "nan", "--dest", "d"], ["score", "x", "--batch-size", "0"], ["bogus"]],
)  # fmt: skip
def test_help_and_argument_errors_import_nothing_heavy(args):
    result = _python(HELP, *args)
    assert result.stderr.strip().endswith(f"HEAVY [] {0 if '--help' in args else 2}"), result.stderr[-2000:]


def test_every_option_has_help_that_gives_its_default():
    parser = build_parser()
    commands = next(action for action in parser._actions if action.choices and "score" in action.choices)
    for name, command in commands.choices.items():
        for action in command._actions:
            if not action.option_strings or action.help == "==SUPPRESS==":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.nargs != 0:  # flags are off unless given
                assert "default" in action.help or "required" in action.help or "(or --" in action.help, (
                    f"{name} {action.option_strings[0]}: the help does not say its default: {action.help!r}"
                )
    filter_help = commands.choices["filter"].format_help()
    assert "accelerate" not in filter_help


def test_the_readme_quick_start_shows_its_output():
    """The README's first command and the output it prints (scores to 0.002)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    shown = readme.split("qscorer score examples/images\n```", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    result = subprocess.run([sys.executable, "-m", "qscorer_reward.cli", "score", "examples/images"], cwd=root,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Nothing but the model line and the summary: no library noise (issue 21 item 21).
    assert result.stderr.splitlines() == [
        "model: qscorer-tiny; scores in [1, 5], higher is better",
        "scored 12 image(s), 0 failed",
    ], result.stderr
    expected_lines, got_lines = shown.strip("\n").splitlines(), result.stdout.strip("\n").splitlines()
    assert expected_lines[0] == got_lines[0] == "  score  path"
    assert [line.split()[1] for line in expected_lines[1:]] == [line.split()[1] for line in got_lines[1:]]
    for expected, got in zip(expected_lines[1:], got_lines[1:]):
        assert float(expected.split()[0]) == pytest.approx(float(got.split()[0]), abs=0.002)
