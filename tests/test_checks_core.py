"""The check runtime: friendly failures, student calls, the own-work guard, the success line."""

from __future__ import annotations

import functools
import math
import textwrap

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from torch import nn

from course_lib.checks.core import (
    OWN_WORK_MESSAGE,
    CheckFailure,
    call_student,
    check,
    current_check,
    expect,
    fail,
)
from course_lib.instructor.execute import apply_notebook_env
from course_lib.model import lora as lora_lib

STUB = "Fill-in 'nb99_f_impl' is not done yet: replace this line with your code, run the cell"


def student_namespace(source: str) -> dict:
    """Run ``source`` as a notebook cell would: in a fresh global namespace of its own."""
    namespace: dict = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(source), "<student cell>", "exec"), namespace)
    return namespace


@check("nb99_square")
def check_square(fn):
    got = call_student(fn, 3, what="square(3)")
    expect(got == 9, f"square(3) returned {got!r}, expected 9", hint="return x * x")


def test_success_prints_exactly_the_success_line(capsys):
    ns = student_namespace("def square(x):\n    return x * x\n")
    check_square(ns["square"])
    assert capsys.readouterr().out == "CHECK nb99_square: PASS\n"


def test_failure_carries_check_id_message_and_hint(capsys):
    ns = student_namespace("def square(x):\n    return x + x\n")
    with pytest.raises(CheckFailure) as info:
        check_square(ns["square"])
    exc = info.value
    assert isinstance(exc, AssertionError)  # nbval and grading see an assertion failure
    assert exc.check_id == "nb99_square"
    assert exc.message == "square(3) returned 6, expected 9"
    assert exc.hint == "return x * x"
    assert str(exc) == "square(3) returned 6, expected 9\nHint: return x * x"
    assert exc.__cause__ is None and exc.__suppress_context__  # no chained traceback
    assert capsys.readouterr().out == ""  # no success line


def test_rendered_block_is_short_and_has_no_traceback():
    exc = CheckFailure("what was seen", "what to do", check_id="nb99_x")
    lines = exc._render_traceback_()
    text = "\n".join(lines)
    assert "CHECK nb99_x: not passed yet" in text
    assert "what was seen" in text and "Hint:" in text and "what to do" in text
    assert "Traceback" not in text and "course_lib" not in text
    assert len(lines) == 3


def test_unfilled_stub_says_once_what_to_do():
    ns = student_namespace(f"def square(x):\n    raise NotImplementedError({STUB!r})\n")
    with pytest.raises(CheckFailure) as info:
        check_square(ns["square"])
    message = info.value.message
    assert message == "square(3) is not filled in yet: fill in square above, then run this cell again."
    assert info.value.hint is None


def test_other_not_implemented_errors_are_the_students_own():
    ns = student_namespace("def square(x):\n    raise NotImplementedError('half not supported')\n")
    with pytest.raises(CheckFailure) as info:
        check_square(ns["square"])
    assert "square(3) raised NotImplementedError: half not supported" in info.value.message


def test_student_exception_becomes_a_diagnosis_naming_the_line():
    source = "def square(x):\n    y = x @ x\n    return y\n"
    ns = student_namespace(source)

    @check("nb99_explained")
    def check_explained(fn):
        call_student(fn, 3, what="square(3)",
                     explain=lambda exc: "x is an int: use x * x" if isinstance(exc, TypeError) else None)

    with pytest.raises(CheckFailure) as info:
        check_explained(ns["square"])
    exc = info.value
    assert exc.message.startswith("square(3) raised TypeError: unsupported operand")
    assert "in your code: line 2" in exc.message
    assert exc.hint == "x is an int: use x * x"


def test_a_shape_clash_without_explanation_still_gets_a_generic_hint():
    ns = student_namespace("import torch\ndef f(x):\n    return x @ torch.ones(5, 2)\n")

    @check("nb99_shape")
    def check_shape(fn):
        call_student(fn, torch.ones(3, 4), what="f(x)")

    with pytest.raises(CheckFailure) as info:
        check_shape(ns["f"])
    assert "f(x) raised RuntimeError" in info.value.message
    assert "fix the fill-in cell" in info.value.hint


def test_plain_assertions_inside_a_check_become_check_failures():
    @check("nb99_plain")
    def check_plain(value):
        assert value == 1, "value must be 1"

    with pytest.raises(CheckFailure, match="value must be 1") as info:
        check_plain(2)
    assert info.value.check_id == "nb99_plain"


def test_current_check_is_set_only_while_a_check_runs():
    seen = []

    @check("nb99_ctx")
    def check_ctx():
        seen.append(current_check())

    assert current_check() is None
    check_ctx()
    assert seen == ["nb99_ctx"] and current_check() is None
    with pytest.raises(CheckFailure) as info:
        fail("outside a check")
    assert info.value.check_id is None


def test_a_typo_in_a_forbid_list_fails_when_the_check_is_defined():
    with pytest.raises((ImportError, AttributeError)):
        check("nb99_typo", forbid=("course_lib.model.lora.NoSuchThing",))


# ---- the own-work guard ------------------------------------------------------------------------


@check("nb99_lora", forbid=("course_lib.model.lora.LoRALayer",))
def check_lora_class(cls):
    layer = call_student(cls, 6, 4, what="LoRALayer(6, 4)")
    out = call_student(layer, torch.ones(2, 6), what="LoRALayer.forward(x)")
    expect(tuple(out.shape) == (2, 4), f"wrong shape {tuple(out.shape)}")


OWN = """
import torch
from torch import nn
class LoRALayer(nn.Module):
    def __init__(self, in_features, out_features, r=2):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
    def forward(self, x):
        return x @ self.lora_A.T @ self.lora_B.T
"""


def test_own_implementation_passes(capsys):
    check_lora_class(student_namespace(OWN)["LoRALayer"])
    assert capsys.readouterr().out == "CHECK nb99_lora: PASS\n"


@pytest.mark.parametrize(
    "source",
    [
        "from course_lib.model.lora import LoRALayer\n",
        "import course_lib.model.lora as L\nLoRALayer = L.LoRALayer\n",
        "from course_lib.model import lora\nclass LoRALayer(lora.LoRALayer):\n    pass\n",
        "import functools\nfrom course_lib.model.lora import LoRALayer as R\n"
        "LoRALayer = functools.partial(R, r=2)\n",
    ],
    ids=["import", "alias", "subclass", "partial"],
)
def test_the_reference_itself_is_refused(source):
    with pytest.raises(CheckFailure) as info:
        check_lora_class(student_namespace(source)["LoRALayer"])
    assert info.value.message == OWN_WORK_MESSAGE.format(name="course_lib.model.lora.LoRALayer") + "."


@pytest.mark.parametrize(
    "source",
    [
        # the student's class delegates to the library, imported into the notebook namespace
        "import torch\nfrom torch import nn\nfrom course_lib.model.lora import LoRALayer as Ref\n"
        "class LoRALayer(nn.Module):\n"
        "    def __init__(self, i, o, r=2):\n        super().__init__()\n        self.impl = Ref(i, o, r=r)\n"
        "    def forward(self, x):\n        return self.impl(x)\n",
        # ... or reached through the module at call time
        "import torch\nfrom torch import nn\nimport course_lib.model.lora as L\n"
        "class LoRALayer(nn.Module):\n"
        "    def __init__(self, i, o, r=2):\n        super().__init__()\n        self.impl = L.LoRALayer(i, o, r=r)\n"
        "    def forward(self, x):\n        return self.impl(x)\n",
        # ... or through the package's lazy re-export
        "import torch\nfrom torch import nn\nimport course_lib\n"
        "class LoRALayer(nn.Module):\n"
        "    def __init__(self, i, o, r=2):\n        super().__init__()\n        self.impl = course_lib.LoRALayer(i, o, r=r)\n"
        "    def forward(self, x):\n        return self.impl(x)\n",
    ],
    ids=["namespace", "module", "package"],
)
def test_delegating_to_the_reference_is_refused_while_the_check_runs(source):
    namespace = student_namespace(source)
    with pytest.raises(CheckFailure) as info:
        check_lora_class(namespace["LoRALayer"])
    assert OWN_WORK_MESSAGE.format(name="course_lib.model.lora.LoRALayer") in info.value.message
    # everything is restored afterwards: the library and the student's namespace
    assert lora_lib.LoRALayer.__module__ == "course_lib.model.lora"
    assert all(not getattr(v, "__name__", "") == "refuse" for v in namespace.values())
    layer = lora_lib.LoRALayer(4, 3, r=2)
    assert isinstance(layer, nn.Module)


@check("nb99_sdpa", forbid=("torch.nn.functional.scaled_dot_product_attention",))
def check_attention(fn):
    q = torch.ones(1, 1, 2, 4)
    out = call_student(fn, q, q, q, what="attention(q, k, v)")
    expect(out.shape == q.shape, "wrong shape")


def test_torch_functions_can_be_forbidden_too():
    cheat = student_namespace(
        "import torch.nn.functional as F\n"
        "def attention(q, k, v):\n    return F.scaled_dot_product_attention(q, k, v)\n"
    )
    with pytest.raises(CheckFailure, match="scaled_dot_product_attention"):
        check_attention(cheat["attention"])
    own = student_namespace(
        "import math, torch\n"
        "def attention(q, k, v):\n"
        "    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n"
        "    return torch.softmax(s, -1) @ v\n"
    )
    check_attention(own["attention"])
    import torch.nn.functional as F  # restored after the check

    q = torch.ones(1, 1, 2, 4)
    assert F.scaled_dot_product_attention(q, q, q).shape == (1, 1, 2, 4)


def test_check_code_itself_may_use_the_reference():
    reference = lora_lib.LoRALayer  # captured before, used outside call_student

    @check("nb99_ref", forbid=("course_lib.model.lora.LoRALayer",))
    def check_with_reference(cls):
        mine = call_student(cls, 6, 4, what="LoRALayer(6, 4)")
        ref = reference(6, 4, r=2)
        expect(mine.lora_A.shape == ref.lora_A.shape, "shapes differ")

    check_with_reference(student_namespace(OWN)["LoRALayer"])


def test_wrapped_student_functions_are_unwrapped_for_the_identity_check():
    @functools.wraps(lora_lib.lora_savings)
    def wrapper(*a):
        return lora_lib.lora_savings(*a)

    @check("nb99_savings", forbid=("course_lib.model.lora.lora_savings",))
    def check_savings(fn):
        expect(math.isclose(call_student(fn, 8, 8, 1, what="f"), 4.0), "wrong")

    with pytest.raises(CheckFailure, match="own implementation"):
        check_savings(wrapper)


# ---- in a real kernel: what the student sees ------------------------------------------------


@pytest.mark.slow
def test_in_a_kernel_the_failure_renders_as_the_friendly_block(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("def square(x):\n    return x + x"),
        nbformat.v4.new_code_cell(
            "from course_lib.checks.core import check, call_student, expect\n"
            "@check('nb99_square')\n"
            "def check_square(fn):\n"
            "    got = call_student(fn, 3, what='square(3)')\n"
            "    expect(got == 9, f'square(3) returned {got}, expected 9', hint='return x * x')\n"
            "check_square(square)"
        ),
    ]
    apply_notebook_env()
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError):
        client.execute()
    error = next(o for o in nb.cells[1].outputs if o.output_type == "error")
    assert error.ename == "CheckFailure"
    assert error.evalue == "square(3) returned 6, expected 9\nHint: return x * x"
    shown = "\n".join(error.traceback)
    assert "CHECK nb99_square: not passed yet" in shown
    assert "Traceback" not in shown and "course_lib" not in shown and "File " not in shown
    assert len(error.traceback) == 3


def test_a_lazy_re_export_cached_during_the_check_is_restored():
    import course_lib

    course_lib.__dict__.pop("LoRALayer", None)  # not cached yet: the student's call caches it
    source = (
        "import torch\nfrom torch import nn\nimport course_lib\n"
        "class LoRALayer(nn.Module):\n"
        "    def __init__(self, i, o, r=2):\n        super().__init__()\n"
        "        self.impl = course_lib.LoRALayer(i, o, r=r)\n"
    )
    with pytest.raises(CheckFailure, match="own implementation"):
        check_lora_class(student_namespace(source)["LoRALayer"])
    assert course_lib.LoRALayer is lora_lib.LoRALayer
