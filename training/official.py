"""Readers for the official IQA releases, as their authors distribute them.

Each reader takes the folder the release was unpacked into and returns `IQARecord` s with MOS (and
their std, where released) rescaled to 1..5 from the dataset's own scale, and the dataset's standard
split where it has one. Expected files, relative to that folder:

- ``koniq10k``: ``koniq10k_scores_and_distributions.csv`` (image_name, MOS, SD on 1..5), images in
  ``1024x768/``; split from ``koniq10k_distributions_sets.csv`` (set: training / validation / test).
- ``spaq``: ``Annotations/MOS and Image attribute scores.xlsx`` (Image name, MOS on 0..100; or the
  sheet saved as ``.csv``), images in ``TestImage/``; no split.
- ``kadid10k``: ``dmos.csv`` (dist_img, ref_img, dmos on 1..5, var), images in ``images/``; no split.
- ``livec``: ``Data/AllImages_release.mat``, ``Data/AllMOS_release.mat`` (0..100) and
  ``Data/AllStdDev_release.mat``, images in ``Images/``; no split.
- ``agiqa3k``: ``data.csv`` (name, prompt, mos_quality and std_quality on 0..5), images beside it or
  in ``AGIQA-3K/``; no split.
- ``csiq``: ``csiq.DMOS.xlsx`` (sheet ``all_by_image``: image, dst_type, dst_lev, dmos_std, dmos on
  0..1 where lower is better), images under ``dst_imgs/`` (e.g. ``dst_imgs/awgn/1600.AWGN.1.png``);
  no split.

Notes: KonIQ-10k's ``validation`` set becomes ``"val"``, ``training`` ``"train"``. LIVE Challenge's
release lists 1,169 images of which the first 7 are the practice images shown before the study;
as in the literature they are left out when the full release is read. For content-disjoint random
splits, distorted datasets carry their reference image as ``group`` (KADID-10k, CSIQ) and AGIQA-3K
its prompt.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qscorer_reward.extras import require_extra

from .data import IQARecord, rescale_mos, rescale_std
from .xlsx import read_xlsx

require_extra("train", "qscorer_reward.training")

KONIQ_SPLITS = {"training": "train", "validation": "val", "test": "test"}
LIVEC_RELEASE_SIZE = 1169
LIVEC_PRACTICE_IMAGES = 7
# CSIQ's distortion names in the score sheet -> the folder and the file-name token of its images.
CSIQ_DISTORTIONS = {
    "noise": ("awgn", "AWGN"),
    "jpeg": ("jpeg", "JPEG"),
    "jpeg 2000": ("jpeg2000", "jpeg2000"),
    "fnoise": ("fnoise", "fnoise"),
    "blur": ("blur", "BLUR"),
    "contrast": ("contrast", "contrast"),
}


def read_koniq10k(root: str | os.PathLike, resolution: str = "1024x768") -> list[IQARecord]:
    """KonIQ-10k: MOS and SD on 1..5; the training / validation / test split from
    ``koniq10k_distributions_sets.csv`` when present. ``resolution``: the image folder
    (``"1024x768"`` or ``"512x384"``)."""
    root = Path(root)
    rows = _read_csv(root / "koniq10k_scores_and_distributions.csv", ["image_name", "MOS", "SD"])
    splits = {}
    sets_file = root / "koniq10k_distributions_sets.csv"
    if sets_file.is_file():
        for where, row in _read_csv(sets_file, ["image_name", "set"]):
            if row["set"] not in KONIQ_SPLITS:
                raise ValueError(f"{where}: set {row['set']!r} is not one of {sorted(KONIQ_SPLITS)}")
            splits[row["image_name"]] = KONIQ_SPLITS[row["set"]]
    mos_range = (1.0, 5.0)
    return [
        IQARecord(
            path=root / resolution / row["image_name"],
            mos=rescale_mos(_number(row["MOS"], where), mos_range),
            mos_std=rescale_std(_number(row["SD"], where), mos_range),
            split=splits.get(row["image_name"]),
        )
        for where, row in rows
    ]


def read_spaq(root: str | os.PathLike) -> list[IQARecord]:
    """SPAQ: MOS on 0..100 from the annotation workbook (or its CSV export); no official split."""
    root = Path(root)
    sheet = root / "Annotations" / "MOS and Image attribute scores.xlsx"
    if sheet.is_file():
        rows = _table_rows(read_xlsx(sheet), ["Image name", "MOS"], sheet)
    else:
        rows = _read_csv(sheet.with_suffix(".csv"), ["Image name", "MOS"], also_tried=sheet)
    return [
        IQARecord(root / "TestImage" / str(row["Image name"]), rescale_mos(_number(row["MOS"], where), (0.0, 100.0)))
        for where, row in rows
    ]


def read_kadid10k(root: str | os.PathLike) -> list[IQARecord]:
    """KADID-10k: ``dmos`` is a MOS on 1..5 (higher is better) despite its name; ``var`` its variance.
    The reference image (in ``images/`` with the distorted ones) is the group."""
    root = Path(root)
    rows = _read_csv(root / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"])
    mos_range = (1.0, 5.0)
    return [
        IQARecord(
            path=root / "images" / row["dist_img"],
            mos=rescale_mos(_number(row["dmos"], where), mos_range),
            mos_std=rescale_std(math.sqrt(max(_number(row["var"], where), 0.0)), mos_range),
            group=row["ref_img"],
        )
        for where, row in rows
    ]


def read_livec(root: str | os.PathLike) -> list[IQARecord]:
    """LIVE Challenge (LIVE-Wild): MOS (and std) on 0..100 from the release's MATLAB files.

    Needs scipy to read them (``pip install scipy``).
    """
    root = Path(root)
    data = root / "Data"
    names = [str(np.asarray(item).ravel()[0]) for item in _mat_array(data / "AllImages_release.mat")]
    mos = [float(v) for v in _mat_array(data / "AllMOS_release.mat")]
    std_file = data / "AllStdDev_release.mat"
    stds = [float(v) for v in _mat_array(std_file)] if std_file.is_file() else [None] * len(names)
    if not len(names) == len(mos) == len(stds):
        raise ValueError(
            f"{data}: the release files disagree in length: {len(names)} images, {len(mos)} MOS, {len(stds)} std"
        )
    skip = LIVEC_PRACTICE_IMAGES if len(names) == LIVEC_RELEASE_SIZE else 0
    mos_range = (0.0, 100.0)
    return [
        IQARecord(root / "Images" / name, rescale_mos(value, mos_range), rescale_std(std, mos_range))
        for name, value, std in list(zip(names, mos, stds))[skip:]
    ]


def read_agiqa3k(root: str | os.PathLike) -> list[IQARecord]:
    """AGIQA-3K: perceptual-quality MOS (``mos_quality``, ``std_quality``) on 0..5; the prompt is the group."""
    root = Path(root)
    rows = _read_csv(root / "data.csv", ["name", "prompt", "mos_quality", "std_quality"])
    image_dir = root
    if rows and not (root / rows[0][1]["name"]).exists() and (root / "AGIQA-3K" / rows[0][1]["name"]).exists():
        image_dir = root / "AGIQA-3K"
    mos_range = (0.0, 5.0)
    return [
        IQARecord(
            path=image_dir / row["name"],
            mos=rescale_mos(_number(row["mos_quality"], where), mos_range),
            mos_std=rescale_std(_number(row["std_quality"], where), mos_range),
            group=row["prompt"],
        )
        for where, row in rows
    ]


def read_csiq(root: str | os.PathLike) -> list[IQARecord]:
    """CSIQ: DMOS on 0..1 (lower is better), reversed onto 1..5; the reference image is the group."""
    root = Path(root)
    sheet = root / "csiq.DMOS.xlsx"
    if not sheet.is_file():
        raise FileNotFoundError(f"{sheet} not found: expected the CSIQ release's score workbook there")
    rows = _table_rows(read_xlsx(sheet, "all_by_image"), ["image", "dst_type", "dst_lev", "dmos_std", "dmos"], sheet)
    # File names differ in case between distortions; look them up case-insensitively.
    files = {path.name.lower(): path for path in (root / "dst_imgs").rglob("*") if path.is_file()}
    mos_range = (0.0, 1.0)
    records = []
    for where, row in rows:
        reference = _csiq_name(row["image"])
        distortion = str(row["dst_type"]).strip().lower()
        if distortion not in CSIQ_DISTORTIONS:
            raise ValueError(
                f"{where}: unknown distortion {row['dst_type']!r}; expected one of {sorted(CSIQ_DISTORTIONS)}"
            )
        folder, token = CSIQ_DISTORTIONS[distortion]
        name = f"{reference}.{token}.{int(_number(row['dst_lev'], where))}.png"
        records.append(
            IQARecord(
                path=files.get(name.lower(), root / "dst_imgs" / folder / name),
                mos=rescale_mos(_number(row["dmos"], where), mos_range, higher_is_better=False),
                mos_std=rescale_std(_number(row["dmos_std"], where), mos_range),
                group=reference,
            )
        )
    return records


OFFICIAL_READERS: dict[str, Callable[[str | os.PathLike], list[IQARecord]]] = {
    "koniq10k": read_koniq10k,
    "spaq": read_spaq,
    "kadid10k": read_kadid10k,
    "livec": read_livec,
    "agiqa3k": read_agiqa3k,
    "csiq": read_csiq,
}


# ---------------------------------------------------------------------------------------- helpers


def _read_csv(path: Path, required: list[str], also_tried: Path | None = None) -> list[tuple[str, dict]]:
    """(location, row) pairs of a CSV with a header, refusing a file without the ``required`` columns."""
    if not path.is_file():
        tried = f" (nor {also_tried})" if also_tried else ""
        raise FileNotFoundError(f"{path} not found{tried}: is this the folder the dataset was unpacked into?")
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        _require_columns(reader.fieldnames or [], required, path)
        return [(f"{path}, row {index + 2}", row) for index, row in enumerate(reader)]


def _table_rows(table: list[list], required: list[str], path: Path) -> list[tuple[str, dict]]:
    """Rows of a worksheet below its header row (the first row holding all ``required`` names);
    rows without a value in the first required column are skipped (sheet padding)."""

    def names_of(row):
        return [str(cell).strip() if cell is not None else None for cell in row]

    header_index = next((i for i, row in enumerate(table) if all(n in names_of(row) for n in required)), None)
    if header_index is None:
        raise ValueError(f"{path}: no header row with the columns {required} found")
    names = names_of(table[header_index])
    rows = []
    for index, cells in enumerate(table[header_index + 1 :], start=header_index + 2):
        row = {name: cells[column] if column < len(cells) else None for column, name in enumerate(names) if name}
        if row.get(required[0]) not in (None, ""):
            rows.append((f"{path}, row {index}", row))
    return rows


def _require_columns(columns: list[str], required: list[str], path: Path) -> None:
    missing = [name for name in required if name not in columns]
    if missing:
        raise ValueError(f"{path}: missing the column(s) {missing}; found {columns}")


def _number(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return number


def _csiq_name(value) -> str:
    """CSIQ reference names are words or numbers (``1600``), which the workbook stores as floats."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _mat_array(path: Path) -> np.ndarray:
    """The one variable of a MATLAB file (named like the file), flattened."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected the LIVE Challenge release's Data/ folder there")
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise ImportError("reading the LIVE Challenge release (.mat files) needs scipy: pip install scipy") from err
    contents = loadmat(path)
    if path.stem not in contents:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise ValueError(f"{path}: no variable {path.stem!r}; found {found}")
    return np.asarray(contents[path.stem]).ravel()
