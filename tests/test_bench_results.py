"""The README's benchmark table is what bench/ measured: generated from latest.json, no timing."""
import json
import re
import sys
from typing import Any

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import report  # bench/ is not a package: found through sys.path

RESULTS = REPO / "bench" / "results"
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(report.README_BEGIN)
    return text[start:text.index(report.README_END) + len(report.README_END)]


def numbers_in(doc: Any) -> list[float]:
    if isinstance(doc, bool):
        return []
    if isinstance(doc, int | float):
        return [doc]
    if isinstance(doc, dict):
        return [x for v in doc.values() for x in numbers_in(v)]
    if isinstance(doc, list):
        return [x for v in doc for x in numbers_in(v)]
    return []


def test_every_number_in_the_readme_table_is_in_latest_json():
    doc = json.loads((RESULTS / "latest.json").read_text())
    known = numbers_in(doc)
    rows = [line for line in readme_block().splitlines()
            if line.startswith("| ") and not line.startswith("| measurement")]
    assert len(rows) >= 15, rows
    checked = 0
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for cell in cells[1:4]:  # pkisvc, peer, ratio: the measured columns
            for shown in NUMBER.findall(cell):
                decimals = len(shown.split(".")[1]) if "." in shown else 0
                assert any(f"{v:.{decimals}f}" == shown for v in known), (shown, row)
                checked += 1
    assert checked >= 40


def test_the_readme_table_and_chart_are_regenerated_from_latest_json():
    doc = json.loads((RESULTS / "latest.json").read_text())
    assert readme_block() == report.readme_block(doc)
    assert (RESULTS / "latest.md").read_text() == report.markdown(doc)
    assert (RESULTS / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
