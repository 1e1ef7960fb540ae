"""The documentation's code runs as written.

Every ``python`` code block of ``docs/tutorials/*.md``, and of any other page (or the
README) that has the line ``<!-- docs-test: run -->``, is executed in order in
one namespace per page, in a temporary working directory. A block opts out with an
attribute on its fence (```` ```python title="train.py" ````, for code meant to be saved
and run elsewhere) or with ``<!-- docs-test: skip -->`` on the line before it.
Tracebacks point at the Markdown file and line.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN_MARKER = "<!-- docs-test: run -->"
SKIP_MARKER = "<!-- docs-test: skip -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    """One runnable code block: its source and the line of the Markdown file it starts on."""

    code: str
    line: int


def code_blocks(text: str) -> list[Block]:
    """The runnable ``python`` blocks of a Markdown page, in order (fences may be indented)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        start = i + 1
        end = start
        while end < len(lines):
            closing = FENCE.match(lines[end])
            if (
                closing is not None
                and closing["indent"] == indent
                and closing["fence"].startswith(fence[0])
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            end += 1
        previous = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        if info in {"python", "py"} and previous != SKIP_MARKER:
            body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[start:end]]
            blocks.append(Block("\n".join(body) + "\n", start + 1))
        i = end + 1
    return blocks


def _has_run_marker(text: str) -> bool:
    return any(line.strip() == RUN_MARKER for line in text.splitlines())


def pages() -> list[Path]:
    """Tutorials, plus every page (and the README) carrying the run marker."""
    found = set(DOCS.glob("tutorials/*.md"))
    candidates = [*DOCS.rglob("*.md"), ROOT / "README.md"]
    found.update(p for p in candidates if p.is_file() and _has_run_marker(p.read_text()))
    return sorted(found)


def test_code_block_parser_honours_fences_and_opt_outs() -> None:
    """Only plain ``python`` fences run; titled fences and skip-marked blocks do not."""
    text = "\n".join(
        [
            "intro",
            "```python",
            "a = 1",
            "```",
            '```python title="train.py"',
            "raise SystemExit",
            "```",
            SKIP_MARKER,
            "",
            "```python",
            "raise SystemExit",
            "```",
            "```bash",
            "ls",
            "```",
            "!!! note",
            "    ```python",
            "    b = a + 1",
            "    ```",
        ]
    )
    blocks = code_blocks(text)
    assert [b.code for b in blocks] == ["a = 1\n", "b = a + 1\n"]
    assert [b.line for b in blocks] == [3, 18]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documentation_code_blocks_run_in_order(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each page's python blocks execute top to bottom in one namespace without error."""
    blocks = code_blocks(page.read_text())
    assert blocks, f"{page} is tested but has no runnable python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in blocks:
        # Pad so that line numbers in tracebacks are those of the Markdown file.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(page), "exec"), namespace)
