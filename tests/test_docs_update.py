"""benchmarks/docs_update.py: a generated table is replaced in place; hand-written text is never removed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "docs_update", Path(__file__).resolve().parents[1] / "benchmarks" / "docs_update.py")
assert _SPEC is not None and _SPEC.loader is not None
docs_update = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(docs_update)

PAGE = """# Benchmarks

## Training step

Measured on a quiet machine (hand-written).

<!-- begin generated: Training step -->
| old | table |
<!-- end generated: Training step -->

Why the figures are what they are (hand-written).

### A subsection

Older runs.

## Next section

Untouched.
"""


def test_replaces_only_the_block_between_the_markers(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    done = docs_update.update_generated(page, "Training step", "| new | table |\n")
    text = page.read_text()
    assert done == "replaced the generated block"
    assert "| old | table |" not in text and "| new | table |" in text
    assert text == PAGE.replace("| old | table |", "| new | table |")
    # a second run is stable: same file
    docs_update.update_generated(page, "Training step", "| new | table |")
    assert page.read_text() == text


def test_a_section_without_markers_keeps_its_text(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("# B\n\n## DoDNet all-task inference\n\nhand-written table\n\n## Other\n\nkept\n")
    done = docs_update.update_generated(page, "DoDNet all-task inference", "| ratio | 0.97 |")
    text = page.read_text()
    assert done.startswith("inserted")
    begin, end = docs_update.markers("DoDNet all-task inference")
    assert text.index("## DoDNet all-task inference") < text.index(begin) < text.index("| ratio | 0.97 |") \
        < text.index(end) < text.index("hand-written table") < text.index("## Other")
    assert "kept" in text


def test_a_missing_section_is_appended(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("# B\n\n## Loader\n\nsomething\n")
    assert docs_update.update_generated(page, "Training step", "| t |") == "appended a new section"
    text = page.read_text()
    assert text.startswith("# B\n\n## Loader\n\nsomething\n\n## Training step\n")
    assert text.rstrip().endswith(docs_update.markers("Training step")[1])


@pytest.mark.parametrize("broken", [
    "## Training step\n<!-- begin generated: Training step -->\n| t |\n",
    "## Training step\n<!-- end generated: Training step -->\n| t |\n<!-- begin generated: Training step -->\n",
])
def test_unpaired_markers_refuse_and_leave_the_file(tmp_path: Path, broken: str) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(broken)
    with pytest.raises(ValueError, match="unpaired or out of order"):
        docs_update.update_generated(page, "Training step", "| new |")
    assert page.read_text() == broken


def test_the_repository_page_has_paired_markers_for_both_generated_sections() -> None:
    page = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    text = page.read_text()
    for section in ("Training step", "DoDNet all-task inference"):
        begin, end = docs_update.markers(section)
        assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end)
        assert text.index(f"## {section}\n") < text.index(begin)
