"""Every notebook runs: each notebooks/*.py (jupytext percent format, paired with its .ipynb) is
executed top to bottom by a Jupyter kernel in quick mode (DEEPNORM_QUICK=1, tiny grids), so
the notebooks cannot rot.

To regenerate the committed, executed notebooks in full mode (their figures land in
notebooks/figures/):

    python tests/test_notebooks.py [NAME ...]
"""

import os
import pathlib
import sys
import time

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.py"))


def execute(source: pathlib.Path, *, quick: bool, timeout: int = 900):
    """Runs ``source`` in a fresh kernel with the notebooks directory as working directory;
    returns the executed notebook."""
    import jupytext
    import nbclient

    notebook = jupytext.read(source)
    saved = os.environ.get("DEEPNORM_QUICK")
    os.environ["DEEPNORM_QUICK"] = "1" if quick else "0"  # the kernel inherits it
    try:
        client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOKS)}})
        client.execute()
    finally:
        if saved is None:
            os.environ.pop("DEEPNORM_QUICK")
        else:
            os.environ["DEEPNORM_QUICK"] = saved
    return notebook


def test_every_notebook_has_its_pair():
    assert {p.stem for p in SOURCES} == {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    assert {"expected_gradient_norm", "model_update_norm", "stability_map",
            "module_tour"} <= {p.stem for p in SOURCES}


# One notebook runs in the default suite; the rest (1-3 minutes each on 2 cores) are opt-in with
# -m slow. They use the same analysis commands the default suite tests directly.
DEFAULT_SUITE_NOTEBOOKS = {"stability_map"}


@pytest.mark.parametrize("source", [
    p if p.stem in DEFAULT_SUITE_NOTEBOOKS else pytest.param(p, marks=pytest.mark.slow)
    for p in SOURCES], ids=[p.stem for p in SOURCES])
def test_notebook_runs_in_quick_mode(source):
    notebook = execute(source, quick=True, timeout=300)
    errors = [o for cell in notebook.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


if __name__ == "__main__":
    import jupytext

    names = sys.argv[1:]
    for source in SOURCES:
        if names and source.stem not in names:
            continue
        start = time.perf_counter()
        notebook = execute(source, quick=False)
        jupytext.write(notebook, source.with_suffix(".ipynb"))
        print(f"{source.stem}: {time.perf_counter() - start:.0f}s")
