"""Read the cell values of one worksheet of an .xlsx workbook, with the standard library only.

The official SPAQ and CSIQ score sheets are distributed as Excel workbooks; this reads them without
a spreadsheet dependency. It understands what those files hold: numbers, shared and inline
strings, booleans and cached formula results (dates are returned as their serial numbers).
"""

from __future__ import annotations

import posixpath
import re
import zipfile
from pathlib import Path
from xml.etree import ElementTree

_MAIN = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_RELS = "{http://schemas.openxmlformats.org/package/2006/relationships}"
_DOC_RELS = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"
_CELL_REFERENCE = re.compile(r"([A-Z]+)(\d+)")


def read_xlsx(path: str | Path, sheet: str | None = None) -> list[list[str | float | bool | None]]:
    """The rows of worksheet ``sheet`` (default: the first) as lists of cell values.

    Rows and columns keep their positions: empty cells are ``None`` and a row's list is as long as
    its last non-empty cell. Raises `ValueError` naming the file when it is not a readable workbook
    or has no sheet of that name.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            sheet_file = _sheet_file(archive, sheet, path)
            shared = _shared_strings(archive)
            root = ElementTree.fromstring(archive.read(sheet_file))
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError) as err:
        raise ValueError(f"{path}: not a readable .xlsx workbook ({err})") from err

    rows: list[list] = []
    for row in root.iter(f"{_MAIN}row"):
        row_index = int(row.get("r", len(rows) + 1)) - 1
        values: list = []
        for cell in row.iter(f"{_MAIN}c"):
            match = _CELL_REFERENCE.fullmatch(cell.get("r", ""))
            column = _column_index(match.group(1)) if match else len(values)
            values.extend([None] * (column + 1 - len(values)))
            values[column] = _cell_value(cell, shared)
        rows.extend([] for _ in range(row_index + 1 - len(rows)))
        rows[row_index] = values
    return rows


def _sheet_file(archive: zipfile.ZipFile, sheet: str | None, path: Path) -> str:
    workbook = ElementTree.fromstring(archive.read("xl/workbook.xml"))
    sheets = [(s.get("name"), s.get(f"{_DOC_RELS}id")) for s in workbook.iter(f"{_MAIN}sheet")]
    if not sheets:
        raise ValueError(f"{path}: the workbook has no worksheet")
    if sheet is None:
        relation = sheets[0][1]
    else:
        by_name = dict(sheets)
        if sheet not in by_name:
            raise ValueError(f"{path}: no worksheet named {sheet!r}; it has {[name for name, _ in sheets]}")
        relation = by_name[sheet]
    relations = ElementTree.fromstring(archive.read("xl/_rels/workbook.xml.rels"))
    for item in relations.iter(f"{_RELS}Relationship"):
        if item.get("Id") == relation:
            target = item.get("Target")
            return target.lstrip("/") if target.startswith("/") else posixpath.normpath(posixpath.join("xl", target))
    raise ValueError(f"{path}: the workbook does not say where worksheet {sheet or sheets[0][0]!r} is")


def _shared_strings(archive: zipfile.ZipFile) -> list[str]:
    if "xl/sharedStrings.xml" not in archive.namelist():
        return []
    root = ElementTree.fromstring(archive.read("xl/sharedStrings.xml"))
    # A shared string is plain (<t>) or rich text made of runs (<r><t>); its text is all <t> joined.
    return ["".join(t.text or "" for t in item.iter(f"{_MAIN}t")) for item in root.iter(f"{_MAIN}si")]


def _column_index(letters: str) -> int:
    index = 0
    for letter in letters:
        index = index * 26 + ord(letter) - ord("A") + 1
    return index - 1


def _cell_value(cell: ElementTree.Element, shared: list[str]) -> str | float | bool | None:
    kind = cell.get("t", "n")
    if kind == "inlineStr":
        return "".join(t.text or "" for t in cell.iter(f"{_MAIN}t"))
    value = cell.find(f"{_MAIN}v")
    if value is None or value.text is None:
        return None
    if kind == "s":
        return shared[int(value.text)]
    if kind == "b":
        return value.text == "1"
    if kind in ("str", "e"):
        return value.text
    return float(value.text)
