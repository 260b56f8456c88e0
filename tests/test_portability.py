"""What makes the course the same on every machine, checked where a test can check it.

- The accuracies of *untrained* models that notebooks 02 and 03 print in compared cells (the
  pretrained model, the quantised base) are portable: every greedy decision behind them wins by
  a logit margin thousands of times larger than the rounding differences between CPUs.
  (Trained accuracies are not printed in compared cells; see course_lib/claims.py.)
- Figures never need a CJK font: no Chinese text goes into code (figure titles, labels, legends).
- The set-up installs the course's JupyterLab settings (no news toast) and pins the torch range
  that pyproject.toml declares.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from course_lib.data import ADAPT_TASK, PRETRAIN_TASK, TOKENIZER, make_example, make_split
from course_lib.model.lora import LoRAConfig
from course_lib.model.qlora import QLoRAModel, QuantizationConfig
from course_lib.model.tinygpt import WEIGHTS_FILE, load_pretrained
from course_lib.train import exact_match, logits_of

ROOT = Path(__file__).resolve().parents[1]
# fp32 logits of this model are of order 10; two CPUs' kernels disagree by ~1e-5 of that.
PORTABLE_MARGIN = 0.1


@torch.no_grad()
def smallest_margin(model, examples) -> float:
    """The smallest ``top-1 - top-2`` logit gap over every greedy decision exact match makes.

    Decoding stops for a question at its ``<eos>``; later tokens do not count, as in
    ``exact_match``. An accuracy whose every decision wins by more than the CPUs' rounding
    differences is the same on every CPU.
    """
    model.eval()
    block = model.config.block_size
    worst = float("inf")
    by_length: dict[int, list] = {}
    for ex in examples:
        by_length.setdefault(len(ex.prompt), []).append(ex)
    for group in by_length.values():
        seq = torch.tensor([TOKENIZER.encode(ex.prompt) for ex in group])
        active = torch.ones(len(group), dtype=torch.bool)
        for _ in range(max(len(ex.answer) for ex in group) + 1):
            logits = logits_of(model, seq[:, -block:])[:, -1]  # (B, vocab)
            top2 = logits.topk(2, dim=-1).values
            worst = min(worst, (top2[:, 0] - top2[:, 1])[active].min().item())
            nxt = logits.argmax(dim=-1)
            active &= nxt != TOKENIZER.eos_id
            if not active.any():
                break
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return worst


def _qlora(backend: str):
    config = QuantizationConfig(bnb_4bit_use_double_quant=True, backend=backend)
    lora = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return QLoRAModel(load_pretrained(), config, lora).prepare_for_training()


@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason="run `python -m course_lib.pretrain`")
@pytest.mark.usefixtures("one_thread")
def test_untrained_accuracies_in_compared_cells_are_portable():
    adapt_02 = make_split(ADAPT_TASK, n_train=2048, n_val=512, seed=0)[1]
    adapt_03 = make_split(ADAPT_TASK, n_train=2048, n_val=256, seed=0)[1]
    addition = make_split(PRETRAIN_TASK, n_train=0, n_val=512)[1]
    base = load_pretrained()
    cases = {
        "pretrained, notebook 02's carry-less validation": (base, adapt_02),
        "pretrained, notebook 03's carry-less validation": (base, adapt_03),
        "pretrained, addition": (base, addition),
        "pretrained, 358+267= (notebook 03)": (base, [make_example(ADAPT_TASK, 358, 267)]),
        "NF4 + DQ (bitsandbytes), addition": (_qlora("bitsandbytes"), addition),
        "NF4 + DQ (torch backend), addition": (_qlora("torch"), addition),
    }
    margins = {name: smallest_margin(model, data) for name, (model, data) in cases.items()}
    close = {name: m for name, m in margins.items() if m < PORTABLE_MARGIN}
    assert not close, f"greedy decisions closer than {PORTABLE_MARGIN} logits: {close}"


@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason="run `python -m course_lib.pretrain`")
@pytest.mark.usefixtures("one_thread")
def test_the_margin_sees_a_close_call():
    """smallest_margin is small when two logits nearly tie (so the test above can fail)."""
    model = load_pretrained()
    examples = make_split(PRETRAIN_TASK, n_train=0, n_val=64)[1]
    before = smallest_margin(model, examples)
    with torch.no_grad():  # squash the output layer: every logit moves towards the others
        model.lm_head.weight.mul_(1e-4)
    assert smallest_margin(model, examples) < 1e-2 < before
    assert exact_match(load_pretrained(), examples) == 1.0


CJK = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]")


def test_figures_need_no_cjk_font():
    """Chinese stays in markdown: no code cell or widget puts it into a figure.

    matplotlib's default font (DejaVu Sans) has no CJK glyphs; Chinese text in a figure would
    draw boxes and warn on stderr (which fails nbval) on a machine without a CJK font.
    """
    found = []
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code" and CJK.search("".join(cell["source"])):
                found.append(f"{path.name} cell {i}")
    for path in sorted((ROOT / "course_lib" / "widgets").glob("*.py")):
        if CJK.search(path.read_text(encoding="utf-8")):
            found.append(str(path.relative_to(ROOT)))
    assert not found, f"Chinese text in code that may draw figures: {found}"


OVERRIDES = ROOT / "jupyter" / "lab" / "settings" / "overrides.d" / "course_lib.json"


def test_lab_settings_turn_the_news_off_with_valid_values():
    from jupyterlab.commands import get_app_dir

    overrides = json.loads(OVERRIDES.read_text(encoding="utf-8"))
    plugin = "@jupyterlab/apputils-extension:notification"
    assert overrides[plugin]["fetchNews"] == "false"
    schema_path = Path(get_app_dir()) / "schemas" / plugin.replace(":", "/")
    schema = json.loads(schema_path.with_suffix(".json").read_text(encoding="utf-8"))
    properties = schema["properties"]
    for key, value in overrides[plugin].items():
        assert key in properties, f"{key!r} is not a setting of {plugin}"
        allowed = properties[key]
        if "oneOf" in allowed:
            assert value in [option["const"] for option in allowed["oneOf"]], (key, value)
        else:
            assert type(value).__name__ == {"boolean": "bool"}[allowed["type"]], (key, value)


@pytest.mark.skipif(
    not (Path(sys.prefix) / ".course-installed").exists(),
    reason="this environment was not set up by `make setup`",
)
def test_make_setup_installed_the_lab_settings_where_jupyterlab_reads_them():
    from jupyterlab.commands import get_app_dir
    from jupyterlab_server.settings_utils import _get_overrides

    settings_dir = Path(get_app_dir()) / "settings"
    installed = settings_dir / "overrides.d" / OVERRIDES.name
    assert installed.read_text(encoding="utf-8") == OVERRIDES.read_text(encoding="utf-8")
    overrides, error = _get_overrides(str(settings_dir))
    assert not error
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"


def test_makefile_installs_torch_in_pyprojects_range():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    in_make = re.search(r"^TORCH_REQUIREMENT := (.+)$", makefile, re.M)
    in_pyproject = re.search(r'^\s*"(torch[^"]*)",', pyproject, re.M)
    assert in_make and in_pyproject
    assert in_make.group(1).strip() == in_pyproject.group(1)
    assert re.search(r"^TORCH_INDEX_URL \?=\s*$", makefile, re.M), "TORCH_INDEX_URL must be off by default"
