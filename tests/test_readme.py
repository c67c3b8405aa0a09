"""The README's Python examples run as written, and its architecture list names real modules."""

import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"
SRC = Path(__file__).resolve().parents[1] / "src" / "gradsparse"


def test_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # the examples write ckpt.pt
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation


def test_architecture_lists_the_modules_that_exist():
    text = README.read_text()
    section = text[text.index("## Architecture"): text.index("## Python API")]
    listed = re.findall(r"^  ([a-z_]+(?:\.py|/))", section, flags=re.M)
    assert listed, "no module list found"
    for name in listed:
        assert (SRC / name.rstrip("/")).exists(), f"README lists {name}, which does not exist"
    modules = {p.name for p in SRC.glob("*.py") if not p.name.startswith("_")}
    missing = sorted(m for m in modules - {"__init__.py", "bench.py"} if m not in listed)
    assert not missing, f"modules not described in the README architecture list: {missing}"
