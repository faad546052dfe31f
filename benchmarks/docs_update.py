"""Write a benchmark's generated table into docs/benchmarks.md without touching the prose around it.

A generated block sits between two HTML comments, invisible in a Markdown viewer::

    ## Training step
    (hand-written: what was measured, when, the command)
    <!-- begin generated: Training step -->
    | method | step (s) | ...
    <!-- end generated: Training step -->
    (hand-written: what the figures mean, older runs, subsections)

:func:`update_generated` replaces only what lies between the two markers. A section without markers gets
a marked block right under its heading and keeps everything it had (an older hand-pasted table then stays
until someone deletes it); a missing section is appended. Nothing hand-written is ever removed.
"""

from __future__ import annotations

import re
from pathlib import Path


def markers(section: str) -> tuple[str, str]:
    """The begin and end comments of ``section``'s generated block."""
    return f"<!-- begin generated: {section} -->", f"<!-- end generated: {section} -->"


def update_generated(path: Path, section: str, body: str) -> str:
    """Put ``body`` into the generated block of ``## section`` in ``path``; return what was done.

    Raises:
        ValueError: the file has one marker of the pair without the other, or the end before the begin
            (hand-edited; the file is left as it is).
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = markers(section)
    block = f"{begin}\n{body.strip()}\n{end}"
    i, j = text.find(begin), text.find(end)
    if (i < 0) != (j < 0) or (i >= 0 and j < i):
        raise ValueError(f"{path}: the markers of section {section!r} are unpaired or out of order "
                         f"({begin!r} / {end!r}); fix them by hand")
    if i >= 0:
        text, done = text[:i] + block + text[j + len(end):], "replaced the generated block"
    else:
        heading = re.search(rf"^## {re.escape(section)}[ \t]*$", text, flags=re.MULTILINE)
        if heading is None:
            text, done = text.rstrip() + f"\n\n## {section}\n\n{block}\n", "appended a new section"
        else:
            text = text[:heading.end()] + f"\n\n{block}\n" + text[heading.end():]
            done = "inserted a generated block under the heading (the section's older text is kept)"
    path.write_text(text)
    return done
