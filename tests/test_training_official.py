"""Readers of the official IQA releases, on tiny fixture files in each release's own layout."""

import csv
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
from scipy.io import savemat

from qscorer_reward.training.config import DatasetConfig
from qscorer_reward.training.official import (
    read_agiqa3k,
    read_csiq,
    read_kadid10k,
    read_koniq10k,
    read_livec,
    read_spaq,
)
from qscorer_reward.training.sources import load_records
from qscorer_reward.training.xlsx import read_xlsx


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


def write_xlsx(path: Path, sheets: dict[str, dict[str, object]]) -> None:
    """A minimal workbook as spreadsheet programs write it: ``sheets`` maps sheet names to
    ``{"A1": value}`` cells; strings go to the shared-strings table, numbers and booleans inline."""
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel_ns = 'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    shared: list[str] = []
    files = {}
    for number, cells in enumerate(sheets.values(), start=1):
        rows: dict[int, list[str]] = {}
        for reference, value in cells.items():
            row = int("".join(c for c in reference if c.isdigit()))
            if isinstance(value, bool):
                xml = f'<c r="{reference}" t="b"><v>{int(value)}</v></c>'
            elif isinstance(value, (int, float)):
                xml = f'<c r="{reference}"><v>{value}</v></c>'
            else:
                if value not in shared:
                    shared.append(value)
                xml = f'<c r="{reference}" t="s"><v>{shared.index(value)}</v></c>'
            rows.setdefault(row, []).append(xml)
        body = "".join(f'<row r="{r}">{"".join(rows[r])}</row>' for r in sorted(rows))
        files[f"xl/worksheets/sheet{number}.xml"] = f"<worksheet {ns}><sheetData>{body}</sheetData></worksheet>"
    sheet_list = "".join(
        f'<sheet name="{escape(name)}" sheetId="{i}" r:id="rId{i}"/>' for i, name in enumerate(sheets, start=1)
    )
    files["xl/workbook.xml"] = f"<workbook {ns} {rel_ns}><sheets>{sheet_list}</sheets></workbook>"
    relations = "".join(
        f'<Relationship Id="rId{i}" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/'
        f'worksheet" Target="worksheets/sheet{i}.xml"/>'
        for i in range(1, len(sheets) + 1)
    )
    files["xl/_rels/workbook.xml.rels"] = (
        f'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">{relations}</Relationships>'
    )
    strings = "".join(f"<si><t>{escape(s)}</t></si>" for s in shared)
    files["xl/sharedStrings.xml"] = f'<sst {ns} count="{len(shared)}">{strings}</sst>'
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)


# ---------------------------------------------------------------------------------------- xlsx


def test_xlsx_reader_keeps_cell_positions_and_types(tmp_path):
    path = tmp_path / "book.xlsx"
    write_xlsx(
        path, {"first": {"A1": "name", "C1": "score", "A2": "a.png", "C2": 41.5, "D3": True}, "second": {"B2": 7}}
    )
    assert read_xlsx(path) == [["name", None, "score"], ["a.png", None, 41.5], [None, None, None, True]]
    assert read_xlsx(path, "second") == [[], [None, 7.0]]


def test_xlsx_reader_errors_name_the_file(tmp_path):
    path = tmp_path / "book.xlsx"
    write_xlsx(path, {"only": {"A1": 1}})
    with pytest.raises(ValueError, match=r"no worksheet named 'other'.*\['only'\]"):
        read_xlsx(path, "other")
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="broken.xlsx: not a readable .xlsx workbook"):
        read_xlsx(broken)


# ---------------------------------------------------------------------------------------- readers


def test_koniq10k_scores_and_official_split(tmp_path):
    write_csv(
        tmp_path / "koniq10k_scores_and_distributions.csv",
        ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"],
        [["1.jpg", 0, 1, 2, 3, 4, 10, 3.9, 0.6, 70.1], ["2.jpg", 5, 0, 0, 0, 0, 5, 1.0, 0.0, 2.0],
         ["3.jpg", 0, 0, 0, 0, 5, 5, 5.0, 0.0, 99.0]],
    )  # fmt: skip
    records = read_koniq10k(tmp_path)
    assert [r.path for r in records] == [tmp_path / "1024x768" / f"{i}.jpg" for i in (1, 2, 3)]
    assert [r.mos for r in records] == pytest.approx([3.9, 1.0, 5.0])  # already on 1..5
    assert records[0].mos_std == pytest.approx(0.6) and records[0].split is None

    write_csv(tmp_path / "koniq10k_distributions_sets.csv", ["image_name", "MOS", "set"],
              [["1.jpg", 3.9, "training"], ["2.jpg", 1.0, "validation"], ["3.jpg", 5.0, "test"]])  # fmt: skip
    assert [r.split for r in read_koniq10k(tmp_path)] == ["train", "val", "test"]
    assert read_koniq10k(tmp_path, resolution="512x384")[0].path == tmp_path / "512x384" / "1.jpg"


def test_spaq_workbook_and_its_csv_export(tmp_path):
    sheet = {"A1": "Image name", "B1": "MOS", "C1": "Brightness", "A2": "00001.jpg", "B2": 0.0, "C2": 50,
             "A3": "00002.jpg", "B3": 75.0, "A4": "00003.jpg", "B4": 100}  # fmt: skip
    write_xlsx(tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx", {"Sheet1": sheet})
    records = read_spaq(tmp_path)
    assert [r.path.name for r in records] == ["00001.jpg", "00002.jpg", "00003.jpg"]
    assert records[0].path.parent == tmp_path / "TestImage"
    assert [r.mos for r in records] == pytest.approx([1.0, 4.0, 5.0])  # 0..100 -> 1..5
    assert all(r.split is None and r.mos_std is None for r in records)

    other = tmp_path / "csv_export"
    write_csv(other / "Annotations" / "MOS and Image attribute scores.csv", ["Image name", "MOS"], [["00009.jpg", 50]])
    assert [(r.path.name, r.mos) for r in read_spaq(other)] == [("00009.jpg", 3.0)]


def test_kadid10k(tmp_path):
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"],
              [["I01_01_01.png", "I01.png", 4.57, 0.496], ["I01_01_05.png", "I01.png", 1.2, 0.25]])  # fmt: skip
    records = read_kadid10k(tmp_path)
    assert records[0].path == tmp_path / "images" / "I01_01_01.png"
    assert [r.mos for r in records] == pytest.approx([4.57, 1.2])  # a MOS on 1..5, despite the column name
    assert [r.mos_std for r in records] == pytest.approx([np.sqrt(0.496), 0.5])
    assert [r.group for r in records] == ["I01.png", "I01.png"]


def _write_livec(root: Path, names: list[str], mos: list[float], std: list[float]) -> None:
    (root / "Data").mkdir(parents=True)
    cells = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        cells[i, 0] = np.array([name])
    savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cells})
    savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos])})
    savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": np.array([std])})


def test_livec_mat_files(tmp_path):
    _write_livec(tmp_path, ["10.bmp", "100.bmp"], [25.0, 75.0], [10.0, 20.0])
    records = read_livec(tmp_path)
    assert [r.path for r in records] == [tmp_path / "Images" / "10.bmp", tmp_path / "Images" / "100.bmp"]
    assert [r.mos for r in records] == pytest.approx([2.0, 4.0])
    assert [r.mos_std for r in records] == pytest.approx([0.4, 0.8])


def test_livec_full_release_leaves_out_the_seven_practice_images(tmp_path):
    names = [f"t{i}.bmp" for i in range(1, 8)] + [f"{i}.bmp" for i in range(1162)]
    mos = list(np.linspace(0, 100, 1169))
    _write_livec(tmp_path, names, mos, [5.0] * 1169)
    records = read_livec(tmp_path)
    assert len(records) == 1162
    assert records[0].path.name == "0.bmp" and records[0].mos == pytest.approx(1 + 4 * mos[7] / 100)


def test_agiqa3k_images_beside_the_csv_or_in_their_folder(tmp_path):
    header = ["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align"]
    rows = [["AttnGAN_normal_000.jpg", "a cat", "", "", "", 2.5, 0.5, 3.0, 0.4],
            ["sd1.5_lowstep_001.jpg", "a dog", "", "", "", 5.0, 0.25, 4.0, 0.3]]  # fmt: skip
    write_csv(tmp_path / "data.csv", header, rows)
    records = read_agiqa3k(tmp_path)
    assert records[0].path == tmp_path / "AttnGAN_normal_000.jpg"
    assert [r.mos for r in records] == pytest.approx([3.0, 5.0])  # 0..5 -> 1..5
    assert [r.mos_std for r in records] == pytest.approx([0.4, 0.2])
    assert [r.group for r in records] == ["a cat", "a dog"]
    (tmp_path / "AGIQA-3K").mkdir()
    (tmp_path / "AGIQA-3K" / "AttnGAN_normal_000.jpg").write_bytes(b"")
    assert read_agiqa3k(tmp_path)[1].path == tmp_path / "AGIQA-3K" / "sd1.5_lowstep_001.jpg"


def test_csiq_workbook_with_its_header_below_a_title(tmp_path):
    cells = {"A1": "CSIQ DMOS", "D4": "image", "E4": "dst_idx", "F4": "dst_type", "G4": "dst_lev", "H4": "dmos_std",
             "I4": "dmos", "D5": 1600, "E5": 1, "F5": "noise", "G5": 1, "H5": 0.061, "I5": 0.062,
             "D6": "aerial_city", "E6": 3, "F6": "jpeg 2000", "G6": 5, "H6": 0.1, "I6": 0.75}  # fmt: skip
    write_xlsx(tmp_path / "csiq.DMOS.xlsx", {"README": {"A1": "notes"}, "all_by_image": cells})
    (tmp_path / "dst_imgs" / "awgn").mkdir(parents=True)
    (tmp_path / "dst_imgs" / "awgn" / "1600.AWGN.1.png").write_bytes(b"")
    records = read_csiq(tmp_path)
    assert records[0].path == tmp_path / "dst_imgs" / "awgn" / "1600.AWGN.1.png"
    assert records[1].path == tmp_path / "dst_imgs" / "jpeg2000" / "aerial_city.jpeg2000.5.png"
    assert [r.mos for r in records] == pytest.approx([5 - 4 * 0.062, 5 - 4 * 0.75])  # DMOS: lower is better
    assert [r.mos_std for r in records] == pytest.approx([4 * 0.061, 0.4])
    assert [r.group for r in records] == ["1600", "aerial_city"]


@pytest.mark.parametrize(
    ("reader", "filename", "header"),
    [
        (read_koniq10k, "koniq10k_scores_and_distributions.csv", ["image_name", "MOS"]),
        (read_kadid10k, "dmos.csv", ["dist_img", "dmos", "var"]),
        (read_agiqa3k, "data.csv", ["name", "mos"]),
    ],
)
def test_wrong_columns_are_named(tmp_path, reader, filename, header):
    write_csv(tmp_path / filename, header, [["x.png"] + [1.0] * (len(header) - 1)])
    with pytest.raises(ValueError, match=rf"{filename}: missing the column\(s\)"):
        reader(tmp_path)


def test_missing_release_files_are_named(tmp_path):
    for reader in (read_koniq10k, read_spaq, read_kadid10k, read_livec, read_agiqa3k, read_csiq):
        with pytest.raises(FileNotFoundError, match=str(tmp_path)):
            reader(tmp_path)


def test_a_non_numeric_score_names_its_row(tmp_path):
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], [["a.png", "r.png", "n/a", 0.1]])
    with pytest.raises(ValueError, match=r"dmos.csv, row 2: expected a number, got 'n/a'"):
        read_kadid10k(tmp_path)


def test_dataset_config_selects_a_split_and_makes_content_grouped_random_splits(tmp_path):
    rows = [[f"I{ref:02d}_{d:02d}.png", f"I{ref:02d}.png", 3.0, 0.1] for ref in range(20) for d in range(5)]
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
    spec = dict(name="kadid", path=str(tmp_path), format="kadid10k", test_fraction=0.3, split_seed=1)
    test = load_records(DatasetConfig(**spec, split="test"))
    train = load_records(DatasetConfig(**spec, split="train"))
    assert len(test) + len(train) == 100 and 0 < len(test) < 60
    assert not {r.group for r in test} & {r.group for r in train}  # no reference image on both sides
    assert load_records(DatasetConfig(**spec, split="test")) == test  # reproducible
    with pytest.raises(ValueError, match=r"no records in split 'test'.*set test_fraction"):
        load_records(DatasetConfig(name="kadid", path=str(tmp_path), format="kadid10k", split="test"))
