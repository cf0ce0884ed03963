"""README.md's Python blocks run as written, in order, in one namespace.

A block whose first line is the comment ``# sketch`` is compiled only (its names may be
placeholders). Every other block must run after the blocks before it.
"""
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text):
    """(line number, source) of every ```python block, in order."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def is_sketch(source):
    first = next((line.strip() for line in source.splitlines() if line.strip()), "")
    return first.lower().startswith("# sketch")


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\n# sketch\ny(\n```\n"
    blocks = python_blocks(text)
    assert [src for _, src in blocks] == ["x = 1\n", "# sketch\ny(\n"]
    assert [is_sketch(src) for _, src in blocks] == [False, True]
    assert blocks[0][0] == 3


def test_readme_python_blocks_run():
    import torch

    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python block"
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    for line, source in blocks:
        code = compile(source, f"README.md:{line}", "exec")
        if is_sketch(source):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a sample left unconverged by a short max_iter
            try:
                exec(code, namespace)
            except Exception as exc:  # noqa: BLE001 - name the block that failed
                pytest.fail(f"README.md block at line {line} failed: {type(exc).__name__}: {exc}\n{source}")
