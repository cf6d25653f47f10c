"""`qscorer filter` when the disk fills up, when an earlier run was stopped, and when the destination
lies inside a source folder: only complete files ever appear, and nothing is lost."""

import builtins
import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qscorer_reward.cli import main

NAMES = ("a.png", "nested/b.png", "c.png")


@pytest.fixture
def sources(tmp_path):
    """Three noise PNGs (incompressible, 20 to 50 KB) and a score file that passes them all."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name, side in zip(NAMES, (80, 100, 120)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side + 20, 3), dtype=np.uint8)).save(root / name)
    scores = tmp_path / "scores.csv"
    scores.write_text("path,score,error\n" + "".join(f"{root / name},4.0000,\n" for name in NAMES))
    return root, scores


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _filter(root, scores, dest, mode, capsys, *extra):
    status = main(["filter", str(root), "--min-score", "3", "--dest", str(dest), "--mode", mode,
                   "--scores", str(scores), *extra])  # fmt: skip
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _check_outcome(originals, root, dest, mode, status, err):
    """Only complete files at their final names, no temporary pieces, nothing lost; a failure is
    named in the summary."""
    placed = _snapshot(dest) if dest.exists() else {}
    assert not [name for name in placed if name.endswith(".partial")], placed.keys()
    for name, data in placed.items():
        assert data == originals[name], f"{name} is not complete"
    remaining = _snapshot(root)
    for name, data in originals.items():
        assert placed.get(name) == data or remaining.get(name) == data, f"{name} was lost"
        if mode == "move":
            assert (name in placed) != (name in remaining), name  # moved, or left where it was
        else:
            assert remaining[name] == data
    failed = len(originals) - len(placed)
    if failed:
        assert status == 1
        assert f"{failed} FAILED to be placed ({failed} No space left on device; nothing partial left)" in err
    else:
        assert status == 0 and "FAILED" not in err


class DiskWithFreeBytes:
    """A disk under ``dest`` with ``free`` bytes left: every write into a file there, through a
    descriptor (`os.write`) or a file object (`open`), succeeds until they are used up; the write
    that crosses the limit is short and the next raises ENOSPC, as on a full disk. With
    ``fsync_fails``, flushing such a file to the disk fails with ENOSPC (delayed allocation, NFS)."""

    def __init__(self, monkeypatch, dest: Path, free: int, fsync_fails: bool = False):
        self.dest, self.free, self.fsync_fails = os.path.abspath(dest) + os.sep, free, fsync_fails
        self.real_open, self.real_write, self.real_fsync = builtins.open, os.write, os.fsync
        monkeypatch.setattr(builtins, "open", self.open)
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "fsync", self.fsync)

    def _under_dest(self, handle: int) -> bool:
        return os.readlink(f"/proc/self/fd/{handle}").startswith(self.dest)

    def _take(self, size: int) -> int:
        if self.free == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        allowed = min(size, self.free)
        self.free -= allowed
        return allowed

    def write(self, handle, data):
        if not self._under_dest(handle):
            return self.real_write(handle, data)
        return self.real_write(handle, bytes(data[: self._take(len(data))]))

    def fsync(self, handle):
        if self.fsync_fails and self._under_dest(handle):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real_fsync(handle)

    def open(self, file, mode="r", *args, **kwargs):
        stream = self.real_open(file, mode, *args, **kwargs)
        if isinstance(file, int) or not any(flag in mode for flag in "wxa+"):
            return stream
        return _FileOnDisk(stream, self) if os.path.abspath(file).startswith(self.dest) else stream


class _FileOnDisk:
    """A file object whose writes draw on a `DiskWithFreeBytes`."""

    def __init__(self, stream, disk: DiskWithFreeBytes):
        self._stream, self._disk = stream, disk

    def write(self, data):
        allowed = self._disk._take(len(data))
        self._stream.write(data[:allowed])
        return allowed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="tells files apart by /proc/self/fd (Linux)")
@pytest.mark.parametrize("mode", ["copy", "move"])
def test_a_disk_that_fills_up_at_any_byte_leaves_only_complete_files(mode, sources, tmp_path, monkeypatch, capsys):
    root, scores = sources
    originals = _snapshot(root)
    total = sum(map(len, originals.values()))
    pristine = tmp_path / "pristine"
    shutil.copytree(root, pristine)
    # every free-space count from 0 to all three files, in steps of a ninth of the smallest file
    for free in range(0, total + 1, min(map(len, originals.values())) // 9):
        shutil.rmtree(root)
        shutil.copytree(pristine, root)
        dest = tmp_path / f"kept-{mode}-{free}"
        with monkeypatch.context() as patch:
            DiskWithFreeBytes(patch, dest, free)
            if mode == "move":  # as onto another file system, where a move copies
                patch.setattr(os, "link", _no_hard_links)
            status, _, err = _filter(root, scores, dest, mode, capsys)
        _check_outcome(originals, root, dest, mode, status, err)
        if status:  # once there is room, the next run places what failed: no piece blocks it
            status, _, err = _filter(root, scores, dest, mode, capsys)
            assert status == 0, err
        assert _snapshot(dest) == originals


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="tells files apart by /proc/self/fd (Linux)")
def test_a_failing_fsync_removes_the_copy_and_keeps_the_source(sources, tmp_path, monkeypatch, capsys):
    root, scores = sources
    originals = _snapshot(root)
    dest = tmp_path / "kept"
    with monkeypatch.context() as patch:
        DiskWithFreeBytes(patch, dest, free=10**9, fsync_fails=True)
        patch.setattr(os, "link", _no_hard_links)  # as across file systems: the move copies
        status, _, err = _filter(root, scores, dest, "move", capsys)
    assert status == 1 and "3 FAILED to be placed (3 No space left on device" in err
    assert _snapshot(dest) == {} and _snapshot(root) == originals


def _no_hard_links(source, destination, **kwargs):
    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source), None, str(destination))


@pytest.fixture
def small_filesystem(tmp_path):
    """A 128 KB tmpfs (root only; skipped where it cannot be mounted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root; the ENOSPC tests above cover the same ground")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a small file system here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("mode", ["copy", "move"])
def test_filter_onto_a_really_full_file_system(mode, sources, small_filesystem, capsys):
    root, scores = sources
    originals = _snapshot(root)
    (small_filesystem / "filler").write_bytes(b"\0" * 40_000)
    dest = small_filesystem / "kept"
    status, _, err = _filter(root, scores, dest, mode, capsys)
    assert 0 < len(_snapshot(dest)) < len(originals)  # some fitted, some did not
    _check_outcome(originals, root, dest, mode, status, err)
    (small_filesystem / "filler").unlink()
    status, _, err = _filter(root, scores, dest, mode, capsys)
    assert status == 0, err
    assert _snapshot(dest) == originals


# ---------------------------------------------------------------------------------------- earlier runs


def test_a_destination_that_differs_from_its_source_is_not_done(sources, tmp_path, capsys):
    root, scores = sources
    dest = tmp_path / "kept"
    dest.mkdir()
    (dest / "a.png").write_bytes((root / "a.png").read_bytes()[:1000])  # a piece left by a crash
    shutil.copy2(root / "c.png", dest / "c.png")  # placed by an earlier run
    status, out, err = _filter(root, scores, dest, "copy", capsys)
    assert status == 1
    assert f"skipped {root / 'a.png'}: {dest / 'a.png'} exists and is not this file" in err
    assert "copied 1 image(s)" in err and "1 already in place" in err and "1 skipped (destination exists)" in err
    assert (dest / "a.png").read_bytes() == (root / "a.png").read_bytes()[:1000]  # never overwritten
    assert out.count("copy ") == 1


def test_a_move_stopped_after_its_copy_is_finished_by_the_next_run(sources, tmp_path, capsys):
    root, scores = sources
    originals = _snapshot(root)
    dest = tmp_path / "kept"
    dest.mkdir()
    shutil.copy2(root / "a.png", dest / "a.png")  # copied, but the source not yet deleted
    status, _, err = _filter(root, scores, dest, "move", capsys)
    assert status == 0, err
    assert "moved 2 image(s)" in err and "1 already in place" in err
    assert _snapshot(dest) == originals and _snapshot(root) == {}


def test_a_file_already_at_its_destination_is_never_deleted(sources, tmp_path, capsys):
    """``filter DEST/a.png --dest DEST --mode move``: the source is its own destination."""
    root, scores = sources
    data = (root / "a.png").read_bytes()
    status, _, err = _filter(root / "a.png", scores, root, "move", capsys)
    assert status == 0 and "1 already in place" in err
    assert (root / "a.png").read_bytes() == data


def test_the_destination_inside_a_source_folder_is_not_searched(sources, capsys):
    root, scores = sources
    dest = root / "keep"
    for _ in range(2):
        status, _, err = _filter(root, scores, dest, "copy", capsys)
        assert status == 0, err
    assert "3 already in place" in err
    assert sorted(_snapshot(dest)) == sorted(NAMES)  # no keep/keep/...
