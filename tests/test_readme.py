"""The README's code runs as written: "Use it on your model" on tiny models of three architectures."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from paper_world import build_llava15, build_llava_next, build_qwen2_vl, pil_images

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet(tag: str) -> str:
    """The first python block after ``<!-- tested: tag ...-->`` in the README."""
    text = README.read_text()
    m = re.search(rf"<!-- tested: {re.escape(tag)}\b.*?-->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no tested snippet {tag!r}"
    return m.group(1)


@pytest.mark.parametrize("build", [build_llava15, build_llava_next, build_qwen2_vl],
                         ids=["llava-1.5", "llava-next", "qwen2-vl"])
def test_use_it_on_your_model(tmp_path, build):
    folder = build(tmp_path / "model")
    code = readme_snippet("use-on-your-model")
    code, n = re.subn(r'^checkpoint = "[^"]*"', f"checkpoint = {str(folder)!r}", code, flags=re.M)
    assert n == 1
    scope = {"image": pil_images()[0]}
    exec(compile(code, "README.md", "exec"), scope)
    handle = scope["handle"]
    kept, total = handle.stats["tokens"], handle.stats["total"]
    assert len(kept) == 1 and 0 < kept[0] < total[0]
    assert not scope["model"].model._forward_pre_hooks          # the with block detached it
    assert isinstance(scope["answer"], str)
