"""The README's usage example runs as written, on a tiny random Qwen2.5-VL instead of a 7B one."""

import re
from pathlib import Path

import pytest

from tiny_models import tiny_inputs, tiny_target

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "# tests/test_readme.py runs this block"


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    tested = [b for b in blocks if b.startswith(MARKER)]
    assert len(tested) == 1, "README.md must hold exactly one block marked for this test"
    return tested[0]


@pytest.mark.parametrize("batch", [1, 2])
def test_readme_example_runs(tmp_path, monkeypatch, batch):
    model = tiny_target("qwen2_5_vl")
    inputs = tiny_inputs(model, batch=batch, prompt_lens=[5, 9][:batch])
    monkeypatch.chdir(tmp_path)  # the example saves "my-draft" in the working directory
    namespace = {"model": model, "inputs": inputs}
    exec(compile(readme_example(), str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "my-draft").is_dir()
    assert namespace["out"].tokens == namespace["reference"].tokens
