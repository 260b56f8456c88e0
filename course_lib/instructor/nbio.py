"""Reading and writing notebook files, shared by ``course release``, ``course grade`` and the
authoring tools.

- :func:`dumps`: the one serialisation of a notebook the course writes (stable and
  byte-identical when re-run, the format nbformat and Jupyter use);
- :func:`atomic_write`: write a file through a temporary file, so a reader never sees half of it;
- :func:`load_json_notebook` and :func:`notebook_paths`: a notebook as a plain dict, and the
  course's ``NN_name.ipynb`` notebooks of a folder in course order.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

NOTEBOOK_NAME = re.compile(r"^\d\d_[A-Za-z0-9_]+\.ipynb$")


def dumps(nb: dict) -> str:
    """Stable, byte-identical serialisation (the format nbformat and Jupyter use)."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def atomic_write(path: Path, text: str, newline: str = "\n") -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half a file.

    ``newline`` is passed to ``open`` (``""`` keeps the ``\\r\\n`` the csv module writes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_json_notebook(path: Path) -> dict:
    """The notebook at ``path`` as a plain dict (JSON as stored, no validation)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def notebook_paths(folder: Path) -> list[Path]:
    """The ``NN_name.ipynb`` notebooks in ``folder``, in course order (other files are not)."""
    return sorted(p for p in Path(folder).glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))
