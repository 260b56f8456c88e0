"""Fixtures for the browser tests: a temporary copy of the course, JupyterLab, headless Chromium.

``COURSE_E2E`` decides what happens when no browser is available:

- ``auto`` (default, ``make test``): the browser tests are skipped with the reason shown
  (``pytest -rs``);
- ``require`` (``make test-e2e``, CI): a missing Chromium or playwright fails the run;
- ``off``: the browser tests are skipped even when a browser is there.

Chromium is Debian's ``chromium`` (``apt-get install chromium fonts-noto-cjk``: without a CJK
font the Chinese prose renders as boxes, which a test checks), found on PATH or named by
``$COURSE_E2E_CHROMIUM``; playwright never downloads a browser here. Screenshots and the server
log go to ``artifacts/e2e/`` (``$COURSE_E2E_ARTIFACTS`` overrides).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from labdriver import CHROMIUM_ARGS, VIEWPORT, E2EError, LabServer, NotebookPage, find_chromium

ROOT = Path(__file__).resolve().parents[2]
MODES = ("auto", "require", "off")
_SKIPPED: list[str] = []  # why the browser tests were skipped, for the terminal summary


def _mode() -> str:
    mode = os.environ.get("COURSE_E2E", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise pytest.UsageError(f"COURSE_E2E={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def artifacts_dir() -> Path:
    return Path(os.environ.get("COURSE_E2E_ARTIFACTS") or ROOT / "artifacts" / "e2e")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Chromium's path; skips (``auto``) or fails (``require``) with the reason when missing."""
    mode = _mode()
    if mode == "off":
        _SKIPPED.append("turned off with COURSE_E2E=off")
        pytest.skip("browser tests turned off (COURSE_E2E=off)")
    problems = []
    path = find_chromium()
    if path is None:
        where = os.environ.get("COURSE_E2E_CHROMIUM") or "`chromium` on PATH or /usr/bin/chromium"
        problems.append(
            f"no Chromium found ({where}); install Debian's: apt-get install chromium fonts-noto-cjk"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the Python package playwright is missing; run `make setup`")
    if problems:
        reason = "; ".join(problems)
        if mode == "require":
            pytest.fail(f"browser tests required (COURSE_E2E=require) but {reason}", pytrace=False)
        _SKIPPED.append(reason)
        pytest.skip(f"browser tests skipped: {reason} (`make test-e2e` requires them)")
    return path


def pytest_terminal_summary(terminalreporter):
    """Say at the end of the run, without needing ``-rs``, that the browser tests were skipped."""
    if _SKIPPED:
        terminalreporter.write_sep("-", "browser tests (tests/e2e)", yellow=True)
        terminalreporter.write_line(
            f"SKIPPED: {_SKIPPED[0]}. Run `make test-e2e` to require them.", yellow=True
        )


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """``artifacts/e2e/``, emptied of the previous run's screenshots and logs."""
    path = artifacts_dir()
    if path.exists():
        for old in [*path.glob("*.png"), *path.glob("*.log")]:
            old.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _strip_outputs(path: Path) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    nb.get("metadata", {}).pop("widgets", None)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def course_copy(tmp_path_factory) -> Path:
    """A temporary copy of notebooks/ and solutions/ (course_lib is installed in the venv).

    The solution notebooks lose their stored outputs, so everything a test sees in them was
    produced in the browser run.
    """
    root = tmp_path_factory.mktemp("course")
    for name in ("notebooks", "solutions"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns(".ipynb_*"))
    for path in (root / "solutions").glob("*.ipynb"):
        _strip_outputs(path)
    return root


@pytest.fixture(scope="session")
def lab_server(chromium_path, course_copy, tmp_path_factory, artifacts):
    server = LabServer(course_copy, tmp_path_factory.mktemp("jupyter"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.log_path.exists():
            shutil.copy(server.log_path, artifacts / "jupyter-server.log")
    if server.forced_kill:
        warnings.warn(
            f"jupyter lab or its kernels did not stop on SIGTERM within 20 s; killed pids "
            f"{server.forced_kill} (server log: {artifacts / 'jupyter-server.log'})",
            stacklevel=1,
        )


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def open_notebook(request, browser, lab_server, course_copy, artifacts):
    """``open_notebook("notebooks/00_welcome.ipynb") -> NotebookPage``, open with idle kernel
    (in a ``viewport`` of its own if one is given, e.g. ``{"width": 1280, "height": 800}``).

    Each call gets a fresh browser context; its kernel is shut down after the test.
    """
    opened: list[NotebookPage] = []
    contexts = []
    request.node.e2e_pages = opened

    def _open(notebook: str, viewport: dict | None = None) -> NotebookPage:
        path = course_copy / notebook
        if not path.exists():
            raise FileNotFoundError(f"{notebook} is not in the course copy {course_copy}")
        n_cells = len(json.loads(path.read_text(encoding="utf-8"))["cells"])
        context = browser.new_context(viewport=viewport or VIEWPORT)
        contexts.append(context)
        page = context.new_page()
        nb = NotebookPage(page, lab_server, notebook, artifacts)
        opened.append(nb)
        nb.open(n_cells)
        return nb

    yield _open
    for nb in opened:
        nb.close()
    for context in contexts:
        context.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure that did not come from the driver, add a screenshot and the server log."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    if call.excinfo is not None and call.excinfo.errisinstance(E2EError):
        return  # its message already carries the screenshot and the server log
    pages = getattr(item, "e2e_pages", [])
    for nb in pages:
        try:
            report.sections.append(("e2e screenshot", str(nb.screenshot("FAILED-test"))))
        except Exception as exc:
            report.sections.append(("e2e screenshot", f"could not take one: {exc!r}"))
    if pages:
        report.sections.append(("jupyter server log", pages[0].server.log_excerpt()))
