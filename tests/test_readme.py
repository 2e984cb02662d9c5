"""The README's tour runs as pasted, and the documentation's relative links lead somewhere.

Every ```python block of README.md is executed, in order, as one script in a fresh interpreter
started outside the repository (so it sees only the installed or PYTHONPATH'd package, as a
reader who pastes it would). The tour checks its own claims with asserts (output shapes, the
DeepNorm constants against their formulas, jit against eager), so a wrong comment fails here.
"""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# What the tour tests is that it runs, not how fast XLA's optimized code is: the lowest backend
# optimization level halves its compile time on CPU (the whole script is compiling).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def python_blocks(markdown: str) -> list[str]:
    return PYTHON_BLOCK.findall(markdown)


def relative_links(markdown: str) -> list[str]:
    """Link targets that are files of this repository (no URLs, no in-page anchors)."""
    targets = [t.split("#", 1)[0] for t in MARKDOWN_LINK.findall(markdown)]
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]


def test_python_blocks_are_found_and_other_fences_ignored():
    text = ("intro\n```bash\npip install x\n```\n```python\na = 1\n```\ntext\n"
            "```\nplain\n```\n```python\nb = a + 1\n```\n")
    assert python_blocks(text) == ["a = 1\n", "b = a + 1\n"]


def test_relative_links_skip_urls_and_anchors():
    text = "[a](docs/x.md) [b](https://e.org/y) [c](#top) [d](../z.md#part) ![e](f.png)"
    assert relative_links(text) == ["docs/x.md", "../z.md", "f.png"]


def run_blocks(blocks: list[str], tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "blocks.py"
    script.write_text("\n\n".join(blocks))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS"), FAST_COMPILE])))
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


def test_readme_tour_runs_as_pasted(tmp_path):
    blocks = python_blocks(README.read_text())
    assert any("Transformer(" in block for block in blocks), "README.md lost its python tour"
    proc = run_blocks(blocks, tmp_path)
    assert proc.returncode == 0, f"README tour failed:\n{proc.stderr[-4000:]}"
    assert "(2, 16, 64)" in proc.stdout  # the custom NNX model's output shape, as commented


def test_schemes_page_snippets_run_after_the_tour_imports(tmp_path):
    """docs/schemes.md's snippets continue the tour: its imports and ``tokens`` come first."""
    blocks = python_blocks((ROOT / "docs" / "schemes.md").read_text())
    assert any("admin_initialize" in block for block in blocks)
    preamble = ("import jax, jax.numpy as jnp\nfrom flax import nnx\n"
                "from deepnorm import TransformerConfig, Transformer\n"
                "tokens = jnp.ones((2, 16), jnp.int32)\n")
    proc = run_blocks([preamble, *blocks], tmp_path)
    assert proc.returncode == 0, f"docs/schemes.md snippet failed:\n{proc.stderr[-4000:]}"


def test_relative_links_of_the_documentation_resolve():
    pages = [README, ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "RESULTS.md",
             *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)} -> {target}"
              for page in pages for target in relative_links(page.read_text())
              if not (page.parent / target).exists()]
    assert not broken, "links to missing files: " + "; ".join(broken)
