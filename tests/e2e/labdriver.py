"""Drive JupyterLab in headless Chromium for the end-to-end tests (tests/e2e/).

:class:`LabServer` runs ``jupyter lab`` from the project's virtualenv on a free loopback port
with a token, in an isolated Jupyter configuration, and stops it by its pid.
:class:`NotebookPage` opens one notebook in a browser page and runs cells the way a student does
(keyboard and menus), waiting on the kernel state instead of sleeping.
:func:`check_widget_reacts` is the widget check shared by every widget notebook.

Every wait has a deadline; when one runs out the page is screenshotted and an :class:`E2EError`
is raised whose message names what did not appear, the screenshot and the server log.
Nothing is retried.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}

# Deadlines (milliseconds, as Playwright takes them).
SERVER_START_S = 60
OPEN_MS = 60_000  # page load + kernel start
CELL_MS = 120_000  # one cell, or "run all" of one solution notebook
CHANGE_MS = 30_000  # the figure/summary redraw after a slider move
SERVER_LOG_LINES = 60


class E2EError(AssertionError):
    """Something did not appear or behave in the browser (message says what, where to look)."""


def find_chromium() -> str | None:
    """Path of the Chromium binary: ``$COURSE_E2E_CHROMIUM``, else ``chromium`` on PATH."""
    override = os.environ.get("COURSE_E2E_CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere): the server's kernels."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class LabServer:
    """``jupyter lab`` serving ``root_dir`` on 127.0.0.1 with a random token.

    ``workdir`` receives the isolated Jupyter config/data/runtime directories and the server
    log, so neither the user's settings nor their workspaces affect the test.
    """

    def __init__(self, root_dir: Path, workdir: Path, jupyter: Path | None = None):
        self.root_dir = Path(root_dir)
        self.workdir = Path(workdir)
        self.jupyter = Path(jupyter) if jupyter else Path(sys.prefix) / "bin" / "jupyter"
        self.port = 0
        self.token = os.urandom(16).hex()
        self.log_path = self.workdir / "jupyter-server.log"
        self.process: subprocess.Popen | None = None
        self.forced_kill: list[int] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def _write_config(self) -> dict[str, str]:
        config = self.workdir / "jupyter-config"
        (config / "labconfig").mkdir(parents=True, exist_ok=True)
        lab = {
            "LabApp": {
                # Offline and quiet: no news feed, update check or PyPI extension manager.
                "news_url": None,
                "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                "extension_manager": "readonly",
                "workspaces_dir": str(self.workdir / "workspaces"),
                "user_settings_dir": str(self.workdir / "user-settings"),
            },
            "ServerApp": {
                "terminals_enabled": False,
                "jpserver_extensions": {"jupyter_lsp": False},
            },
        }
        (config / "jupyter_lab_config.json").write_text(json.dumps(lab, indent=1))
        # No page_config here: the "get Jupyter news?" toast must stay away because of the
        # course's own settings (make setup installs them into the venv), which the tests check.
        env = dict(os.environ)
        env.update(
            JUPYTER_CONFIG_DIR=str(config),
            JUPYTER_DATA_DIR=str(self.workdir / "jupyter-data"),
            JUPYTER_RUNTIME_DIR=str(self.workdir / "jupyter-runtime"),
            IPYTHONDIR=str(self.workdir / "ipython"),
            JUPYTER_PLATFORM_DIRS="1",
        )
        return env

    def start(self) -> None:
        if not self.jupyter.exists():
            raise E2EError(f"{self.jupyter} not found: run `make setup` to create the virtualenv")
        env = self._write_config()
        self.port = free_loopback_port()
        cmd = [
            str(self.jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
        ]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            cmd, cwd=self.root_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if self.process.poll() is not None:
                raise E2EError(
                    f"jupyter lab exited with status {self.process.returncode} before serving "
                    f"on port {self.port}.\n{self.log_excerpt()}"
                )
            try:
                self.api("/api/status")
                return
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise E2EError(
                    f"jupyter lab did not answer /api/status within {SERVER_START_S} s.\n"
                    f"{self.log_excerpt()}"
                )
            time.sleep(0.2)  # polling the server's port, not waiting for a result

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server by its pid: SIGTERM (it shuts its kernels down), SIGKILL if stuck.

        Kernels still alive afterwards (children of the server) are killed by pid too; their
        pids are recorded in :attr:`forced_kill`.
        """
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        kernels = _child_pids(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            self.forced_kill.append(proc.pid)
        for pid in kernels:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
                self.forced_kill.append(pid)

    # -- HTTP --------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, method: str = "GET", body: Any = None) -> Any:
        headers = {"Authorization": f"token {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.base_url + path, method=method, headers=headers, data=data
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def set_user_settings(self, plugin: str, values: dict) -> None:
        """Replace this server's user settings of ``plugin`` (its isolated settings directory)."""
        self.api(f"/lab/api/settings/{plugin}", method="PUT", body={"raw": json.dumps(values)})

    def lab_url(self, notebook: str) -> str:
        return f"{self.base_url}/lab/tree/{notebook}?reset&token={self.token}"

    def session_for(self, notebook: str) -> dict | None:
        for session in self.api("/api/sessions"):
            if session.get("path") == notebook:
                return session
        return None

    def shutdown_session(self, notebook: str) -> None:
        session = self.session_for(notebook)
        if session is not None:
            self.api(f"/api/sessions/{session['id']}", method="DELETE")

    def log_excerpt(self, lines: int = SERVER_LOG_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            text = ["(no server log)"]
        return (
            f"--- jupyter server log ({self.log_path}), last {lines} lines ---\n"
            + "\n".join(text[-lines:])
        )


# JavaScript run in the page: the state of the notebook's cells, in file order.
_CELLS_JS = """
(root) => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!panel) return null;
  const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  const cells = [...panel.querySelectorAll('.jp-Notebook .jp-Cell')].map((cell) => {
    const code = cell.classList.contains('jp-CodeCell');
    const prompt = code ? (cell.querySelector('.jp-InputPrompt')?.textContent ?? '') : '';
    const outputs = [...cell.querySelectorAll('.jp-OutputArea-output')];
    return {
      code,
      prompt: prompt.trim(),
      stderr: outputs.filter((o) => o.dataset.mimeType === 'application/vnd.jupyter.stderr')
                     .map((o) => o.innerText),
      text: outputs.map((o) => o.innerText).join('\\n'),
    };
  });
  return {status: indicator ? indicator.dataset.status : null, cells};
}
"""

# JavaScript run in the page: render an element's CJK characters (and two code points that no
# font has) on a canvas in the element's font, and compare the pixels.
_GLYPHS_JS = r"""
(selector) => {
  const el = document.querySelector(selector);
  if (!el) return null;
  const style = getComputedStyle(el);
  const font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
  const canvas = document.createElement('canvas');
  canvas.width = 96; canvas.height = 96;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  const draw = (ch) => {
    ctx.clearRect(0, 0, 96, 96);
    ctx.font = font;
    ctx.fillStyle = '#000';
    ctx.fillText(ch, 8, 64);
    return Array.from(ctx.getImageData(0, 0, 96, 96).data).join(',');
  };
  const text = el.textContent;
  const characters = [...new Set(text.match(/[\u4e00-\u9fff]/g) || [])].slice(0, 6);
  const missing = [draw('\u{10FFFC}'), draw('\u{10FFFD}')];
  const drawn = characters.map(draw);
  return {
    text, characters, font,
    distinct: new Set(drawn).size === drawn.length,
    like_missing: characters.filter((c, i) => drawn[i] === missing[0]),
    missing_identical: missing[0] === missing[1],
  };
}
"""

# JavaScript run in the page: where the given texts of a cell's output are drawn, and the part
# of the notebook that is visible without scrolling.
_OUTPUT_TEXT_JS = r"""
([index, needles]) => {
  const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const cell = p.querySelectorAll('.jp-Notebook .jp-Cell')[index];
  const out = cell.querySelector('.jp-OutputArea');
  const nodes = [];
  let text = '';
  const walker = document.createTreeWalker(out, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) { nodes.push([walker.currentNode, text.length]); text += walker.currentNode.data; }
  const locate = (pos) => {
    for (let k = nodes.length - 1; k >= 0; k--) if (nodes[k][1] <= pos) return [nodes[k][0], pos - nodes[k][1]];
    return null;
  };
  const rects = {};
  for (const needle of needles) {
    const at = text.indexOf(needle);
    if (at < 0) { rects[needle] = null; continue; }
    const [sn, so] = locate(at);
    const [en, eo] = locate(at + needle.length - 1);
    const range = document.createRange();
    range.setStart(sn, so);
    range.setEnd(en, eo + 1);
    const b = range.getBoundingClientRect();
    rects[needle] = {top: b.top, bottom: b.bottom, left: b.left, right: b.right};
  }
  const scroller = p.querySelector('.jp-WindowedPanel-outer') || p.querySelector('.jp-Notebook');
  const s = scroller.getBoundingClientRect();
  return {
    text: out.innerText, rects,
    view: {top: Math.max(s.top, 0), bottom: Math.min(s.bottom, innerHeight),
           left: Math.max(s.left, 0), right: Math.min(s.right, innerWidth)},
  };
}
"""

_PROMPT = re.compile(r"^\[(\d+|\*| )\]:$")


def _count(prompt: str) -> str:
    match = _PROMPT.match(prompt)
    return match.group(1) if match else "?"


class NotebookPage:
    """One notebook open in JupyterLab in a Playwright page."""

    def __init__(self, page: Any, server: LabServer, notebook: str, artifacts: Path):
        self.page = page
        self.server = server
        self.notebook = notebook  # path relative to the server root, e.g. notebooks/00_x.ipynb
        self.artifacts = Path(artifacts)
        self.name = Path(notebook).stem
        self.console_errors: list[str] = []
        self._failures = 0
        page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        page.on(
            "console",
            lambda msg: self.console_errors.append(f"console.{msg.type}: {msg.text}")
            if msg.type == "error" else None,
        )

    # -- failing with evidence ---------------------------------------------------------------
    def screenshot(self, label: str, locator: Any = None) -> Path:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{self.name}-{label}.png"
        (locator or self.page).screenshot(path=str(path))
        return path

    def fail(self, message: str) -> E2EError:
        """An :class:`E2EError` carrying a fresh screenshot, browser errors and the server log."""
        self._failures += 1
        try:
            shot = f"screenshot: {self.screenshot(f'FAILED-{self._failures}')}"
        except Exception as exc:  # the page itself may be gone; say so instead of hiding it
            shot = f"screenshot failed: {exc!r}"
        browser = "\n".join(self.console_errors[-20:]) or "(none)"
        return E2EError(
            f"{self.notebook}: {message}\n{shot}\nbrowser errors:\n{browser}\n"
            f"{self.server.log_excerpt()}"
        )

    def _wait_js(self, js: str, arg: Any, timeout_ms: int, what: str) -> Any:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            return self.page.wait_for_function(js, arg=arg, timeout=timeout_ms, polling=100)
        except PlaywrightTimeout:
            raise self.fail(
                f"timed out after {timeout_ms / 1000:.0f} s waiting for {what}; "
                f"cells now: {self._summary_of_cells()}"
            ) from None

    def cells(self) -> list[dict]:
        state = self.page.evaluate(_CELLS_JS)
        return state["cells"] if state else []

    def _summary_of_cells(self) -> str:
        try:
            state = self.page.evaluate(_CELLS_JS)
        except Exception as exc:
            return f"(page not readable: {exc!r})"
        if not state:
            return "(no notebook panel)"
        prompts = [c["prompt"] for c in state["cells"] if c["code"]]
        return f"kernel status {state['status']!r}, code cell prompts {prompts}"

    # -- opening and running -----------------------------------------------------------------
    def open(self, n_cells: int) -> None:
        """Open the notebook and wait until its ``n_cells`` cells show and its kernel is idle."""
        self.page.goto(self.server.lab_url(self.notebook), timeout=OPEN_MS)
        self._wait_js(
            """(n) => {
                const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                return p && p.querySelectorAll('.jp-Notebook .jp-Cell').length === n;
            }""",
            n_cells, OPEN_MS, f"the notebook to show its {n_cells} cells",
        )
        # The toolbar indicator reads "idle" for a moment before the kernel is even started,
        # so first wait for the server to report this notebook's kernel idle, then the page.
        deadline = time.monotonic() + OPEN_MS / 1000
        while True:
            session = self.server.session_for(self.notebook)
            if session and session["kernel"]["execution_state"] == "idle":
                break
            if time.monotonic() > deadline:
                state = session["kernel"]["execution_state"] if session else "no session"
                raise self.fail(f"the kernel did not become idle after opening (state: {state})")
            self.page.wait_for_timeout(100)  # polling the server, not waiting for a result
        self._wait_kernel_idle(OPEN_MS, "the kernel status indicator to show idle")

    def _wait_kernel_idle(self, timeout_ms: int, what: str) -> None:
        self._wait_js(
            """() => {
                const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                const ind = p && p.querySelector('.jp-Notebook-ExecutionIndicator');
                return ind && ind.dataset.status === 'idle';
            }""",
            None, timeout_ms, what,
        )

    def cell_locator(self, index: int) -> Any:
        return self.page.locator(
            ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell"
        ).nth(index)

    def run_cell(self, index: int, timeout_ms: int = CELL_MS) -> dict:
        """Select code cell ``index`` (file order), run it with Ctrl+Enter, wait until done."""
        before = self.cells()[index]
        if not before["code"]:
            raise ValueError(f"cell {index} of {self.notebook} is not a code cell")
        self.cell_locator(index).locator(".jp-InputPrompt").click()  # selects the cell
        self.page.keyboard.press("Escape")  # command mode
        self.page.keyboard.press("Control+Enter")
        self._wait_js(
            """([i, before]) => {
                const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                const cell = p.querySelectorAll('.jp-Notebook .jp-Cell')[i];
                const prompt = cell.querySelector('.jp-InputPrompt').textContent.trim();
                const ind = p.querySelector('.jp-Notebook-ExecutionIndicator');
                return /^\\[\\d+\\]:$/.test(prompt) && prompt !== before
                       && ind && ind.dataset.status === 'idle';
            }""",
            [index, before["prompt"]], timeout_ms,
            f"cell {index} to finish (prompt was {before['prompt']!r})",
        )
        return self.cells()[index]

    def run_all(self, timeout_ms: int = CELL_MS) -> list[dict]:
        """Run > Run All Cells from the menu bar; wait until every code cell ran or one failed."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        # Before the run every prompt is "[ ]:" and nothing failed, so this cannot hold early.
        self._wait_js(
            """() => {
                const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                const ind = p.querySelector('.jp-Notebook-ExecutionIndicator');
                const code = [...p.querySelectorAll('.jp-Notebook .jp-CodeCell')];
                const prompts = code.map((c) => c.querySelector('.jp-InputPrompt')
                                                 .textContent.trim());
                if (prompts.some((t) => t === '[*]:')) return false;
                const failed = p.querySelector(
                    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]');
                const done = prompts.every((t) => /^\\[\\d+\\]:$/.test(t));
                return (done || failed) && ind && ind.dataset.status === 'idle';
            }""",
            None, timeout_ms, "Run All Cells to finish",
        )
        cells = self.cells()
        problems = [
            f"cell {i} wrote to stderr/raised:\n{'; '.join(c['stderr'])[:1500]}"
            for i, c in enumerate(cells) if c["stderr"]
        ]
        not_run = [i for i, c in enumerate(cells) if c["code"] and not _count(c["prompt"]).isdigit()]
        if problems or not_run:
            raise self.fail(
                "Run All Cells did not run cleanly: "
                + "\n".join(problems + ([f"cells never run: {not_run}"] if not_run else []))
            )
        counts = [int(_count(c["prompt"])) for c in cells if c["code"]]
        if counts != list(range(1, len(counts) + 1)):
            raise self.fail(f"execution counts are not 1..n in order on a fresh kernel: {counts}")
        return cells

    def run_cells(self, indices: Sequence[int], timeout_ms: int = CELL_MS) -> None:
        """Run code cells ``indices`` one by one; fail on the first that writes to stderr."""
        for i in indices:
            state = self.run_cell(i, timeout_ms)
            if state["stderr"]:
                raise self.fail(f"cell {i} wrote to stderr/raised:\n{'; '.join(state['stderr'])}")

    def scroll_to_top_of_view(self, index: int) -> None:
        """Scroll the notebook so that cell ``index`` starts at the top of its view."""
        self.cell_locator(index).evaluate("(el) => el.scrollIntoView({block: 'start'})")

    def output_text_positions(self, index: int, needles: Sequence[str]) -> dict:
        """Cell ``index``'s output: ``{"text", "rects": {needle: box or None}, "view": box}``,
        boxes in page pixels; ``view`` is the part of the notebook visible without scrolling."""
        return self.page.evaluate(_OUTPUT_TEXT_JS, [index, list(needles)])

    def close(self) -> None:
        self.server.shutdown_session(self.notebook)

    # -- what the page shows -----------------------------------------------------------------
    def shows_text(self, text: str, timeout_ms: int) -> bool:
        """Whether ``text`` appears anywhere on the page within ``timeout_ms``."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            self.page.get_by_text(text).first.wait_for(state="visible", timeout=timeout_ms)
        except PlaywrightTimeout:
            return False
        return True

    def glyphs(self, selector: str) -> dict:
        """How the CJK characters of the first element matching ``selector`` render.

        Each character is drawn on a canvas in the element's computed font (the same font
        fallback as the page). A character no installed font has is drawn as the same empty
        box as any other missing one, so ``characters`` that are all different from each other
        and from ``missing`` (two private-use code points no font has) render with a real font.
        Returns ``{"text", "characters", "distinct", "like_missing", "missing_identical",
        "font"}``.
        """
        report = self.page.evaluate(_GLYPHS_JS, selector)
        if report is None:
            raise self.fail(f"no element matches {selector!r}")
        return report


# -- widgets ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WidgetCase:
    """One interactive course widget: where it is and which slider to move.

    ``title`` picks the dashboard by its bold title (substring; ``None``: the notebook's first
    dashboard); ``slider`` is a substring of the slider's description label; ``keys`` are
    pressed on the focused slider handle (e.g. ``("ArrowRight",)``). ``summary_mentions``, if
    given, is a template such as ``"r={value}:"`` that the summary line must contain after the
    move, ``{value}`` being the slider's new readout: the plotted values follow the slider.
    ``run_only`` restricts which cells run (see :meth:`cells_to_run`).
    """

    notebook: str
    slider: str
    title: str | None = None
    keys: Sequence[str] = ("ArrowRight",)
    summary_mentions: str | None = None
    run_only: str | None = None

    def cells_to_run(self, cells: Sequence[dict]) -> list[int] | None:
        """Code cells to run before the check: ``None`` means Run All Cells.

        With ``run_only`` (a regex), only the code cells whose source matches it run, in order:
        for a notebook too slow to run whole in the browser test (nbval runs it whole), e.g.
        ``run_only=r"attention_memory_dashboard"`` runs the cells that import and show it.
        """
        if self.run_only is None:
            return None
        pattern = re.compile(self.run_only)
        chosen = [
            i for i, c in enumerate(cells)
            if c["cell_type"] == "code" and pattern.search("".join(c["source"]))
        ]
        if not chosen:
            raise ValueError(f"{self.notebook}: no code cell matches run_only={self.run_only!r}")
        return chosen

    @property
    def id(self) -> str:
        return f"{Path(self.notebook).stem}:{self.slider}"


@dataclass
class WidgetState:
    summary: str
    figure_src: str
    slider_value: str


# What a rendered dashboard shows: sliders, a loaded figure image, a summary line.
_WIDGET_STATE_JS = """(el) => {
    const img = el.querySelector('.jp-OutputArea-output img');
    const summary = el.querySelector('.course-widget-summary');
    const state = {
        sliders: el.querySelectorAll('.widget-slider').length,
        img: !!img,
        pixels: !!(img && img.complete && img.naturalWidth > 0),
        summary: summary ? summary.innerText.trim() : null,
    };
    state.ready = state.sliders > 0 && state.pixels && !!state.summary;
    return state;
}"""


def _dashboard(nb: NotebookPage, title: str | None) -> Any:
    dashboards = nb.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .course-widget")
    if title is None:
        return dashboards.first
    return dashboards.filter(has_text=title).first


def _read_widget(nb: NotebookPage, dash: Any, slider: Any) -> WidgetState:
    summary = dash.locator(".course-widget-summary").inner_text().strip()
    imgs = dash.locator(".jp-OutputArea-output img")
    src = (imgs.first.get_attribute("src") or "") if imgs.count() else ""
    handle = slider.locator(".noUi-handle").first
    value = handle.get_attribute("aria-valuetext") or handle.get_attribute("aria-valuenow") or ""
    readout = slider.locator(".widget-readout")
    if readout.count():
        value = readout.first.inner_text().strip() or value
    return WidgetState(summary, src, value)


def check_widget_reacts(nb: NotebookPage, case: WidgetCase, change_ms: int = CHANGE_MS) -> None:
    """The widget of ``case`` shows sliders and a figure, and redraws when its slider moves.

    Asserts: the dashboard is there with at least one slider, a drawn figure (an ``<img>`` with
    pixels) and a non-empty summary; after pressing ``case.keys`` on the slider handle the
    slider value, the summary text and the figure image all change. Screenshots of the output
    area before and after are saved. Raises :class:`E2EError` naming what did not happen.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    tag = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{case.title or 'widget'}-{case.slider}")
    dash = _dashboard(nb, case.title)
    try:  # widget views render after the kernel went idle: wait for the dashboard to attach
        dash.wait_for(state="attached", timeout=change_ms)
    except PlaywrightTimeout:
        raise nb.fail(
            f"no course dashboard (.course-widget, title {case.title!r}) rendered within "
            f"{change_ms / 1000:.0f} s"
        ) from None
    dash.scroll_into_view_if_needed()
    try:
        nb.page.wait_for_function(
            f"(el) => ({_WIDGET_STATE_JS})(el).ready", arg=dash.element_handle(),
            timeout=change_ms, polling=100,
        )
    except PlaywrightTimeout:
        state = dash.evaluate(f"(el) => ({_WIDGET_STATE_JS})(el)")
        raise nb.fail(
            f"the dashboard did not finish rendering within {change_ms / 1000:.0f} s: "
            f"{state['sliders']} sliders (need >= 1), figure <img> present: {state['img']}, "
            f"loaded with pixels: {state['pixels']}, summary line: {state['summary']!r}"
        ) from None
    slider = dash.locator(".widget-slider").filter(
        has=nb.page.locator(".widget-label", has_text=case.slider)
    ).first
    if slider.count() == 0:
        labels = dash.locator(".widget-slider .widget-label").all_inner_texts()
        raise nb.fail(f"no slider labelled {case.slider!r}; slider labels: {labels}")
    before = _read_widget(nb, dash, slider)
    nb.screenshot(f"{tag}-before", dash)

    handle = slider.locator(".noUi-handle").first
    handle.focus()
    for key in case.keys:
        nb.page.keyboard.press(key)

    nb._wait_js(
        """([el, before]) => {
            const h = el.querySelector('.noUi-handle');
            const r = el.querySelector('.widget-readout');
            const v = (r && r.innerText.trim()) || h.getAttribute('aria-valuetext')
                      || h.getAttribute('aria-valuenow') || '';
            return v !== before;
        }""",
        [slider.element_handle(), before.slider_value], change_ms,
        f"slider {case.slider!r} to move from {before.slider_value!r} after keys {list(case.keys)}",
    )
    nb._wait_js(
        """([el, before]) => {
            const s = el.querySelector('.course-widget-summary');
            return s && s.innerText.trim() !== '' && s.innerText.trim() !== before;
        }""",
        [dash.element_handle(), before.summary], change_ms,
        f"the summary line to change from {before.summary!r} after moving {case.slider!r} "
        "(is the slider wired to the plot?)",
    )
    nb._wait_js(
        """([el, before]) => {
            const img = el.querySelector('.jp-OutputArea-output img');
            return img && img.complete && img.naturalWidth > 0 && img.getAttribute('src') !== before;
        }""",
        [dash.element_handle(), before.figure_src], change_ms,
        f"the figure to be redrawn after moving {case.slider!r} (summary changed, image did not)",
    )
    nb._wait_kernel_idle(change_ms, "the kernel to be idle after the redraw")
    after = _read_widget(nb, dash, slider)
    nb.screenshot(f"{tag}-after", dash)
    if after.summary == before.summary or after.figure_src == before.figure_src:
        raise nb.fail(
            f"the widget changed back: summary {before.summary!r} -> {after.summary!r}, "
            f"figure changed: {after.figure_src != before.figure_src}"
        )
    if case.summary_mentions is not None:
        expected = case.summary_mentions.format(value=after.slider_value)
        if expected not in after.summary:
            raise nb.fail(
                f"after moving {case.slider!r} to {after.slider_value!r} the summary line "
                f"{after.summary!r} does not contain {expected!r}: the plot does not show the "
                "slider's value"
            )
