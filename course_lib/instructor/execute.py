"""``course execute``: run solution notebooks top to bottom and store their outputs in place.

Notebooks run with the same environment that nbval uses in ``make test`` (see
:data:`NOTEBOOK_ENV`), so the stored outputs are the ones nbval compares against.
"""

from __future__ import annotations

import os
from pathlib import Path

# Environment every notebook kernel gets under `course execute`, nbval (conftest.py) and grading:
# tqdm bars off (their text would differ run to run), a fixed hash seed for stable set/dict
# iteration, and warnings about missing GPUs kept out of stderr by design rather than filtered.
NOTEBOOK_ENV = {
    "TQDM_DISABLE": "1",
    "PYTHONHASHSEED": "0",
}


def apply_notebook_env(environ: dict | None = None) -> None:
    """Set :data:`NOTEBOOK_ENV` in ``environ`` (default ``os.environ``)."""
    target = os.environ if environ is None else environ
    target.update(NOTEBOOK_ENV)


def execute_notebook(path: Path, timeout: int = 600) -> None:
    """Execute ``path`` in a fresh ``python3`` kernel and write the outputs back to it."""
    import nbclient
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    apply_notebook_env()
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent.resolve())}},
        record_timing=False,
    )
    client.execute()
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
    nb.metadata.pop("widgets", None)  # widget state is per-session; nbval ignores it anyway
    nbformat.write(nb, path)
