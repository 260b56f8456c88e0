"""What every check cell runs on: a friendly failure, student calls, and the own-work guard.

A check function is decorated with :func:`check`::

    @check("nb01_lora_forward", forbid=("course_lib.model.lora.LoRALayer",))
    def check_lora_layer_forward(cls):
        layer = call_student(cls, 12, 10, r=4, what="LoRALayer(12, 10, r=4)")
        ...
        expect(ok, "the scaling is missing", hint="multiply the low-rank branch by self.scaling")

- **Diagnosis first.** A failing check raises :class:`CheckFailure` (an ``AssertionError``):
  what the check saw (``message``) and what to do (``hint``). In Jupyter it renders as a short
  block, the check's name, the diagnosis and the hint, without a traceback of course_lib's
  internals (IPython's ``_render_traceback_`` protocol); nbval and ``course grade`` still see the
  cell fail. A fill-in that still holds the release stub gives one line: "fill in <name> above,
  then run this cell again".
- **Student calls** go through :func:`call_student`: an exception raised by the student's code
  (a shape clash, a typo) becomes a diagnosis naming the student's line, with the check's own
  ``explain(exc)`` hint where it knows the likely cause.
- **Own work.** While a check calls the student's code, the reference implementations named in
  ``forbid`` (dotted names) are replaced, in course_lib's modules and in the student's namespace,
  by a guard that fails with "the check runs your own implementation: write it instead of calling
  <name>". A student object that *is* (or subclasses) a forbidden reference is refused outright.
  The check keeps its private references (captured at import time, called outside
  :func:`call_student`).
- **Success** prints exactly one line, ``CHECK <grade_id>: PASS``; that line is the check cell's
  stored output in ``solutions/``, so a failure whose message was hidden still fails.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import linecache
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

__all__ = [
    "CheckFailure",
    "check",
    "expect",
    "fail",
    "passed",
    "call_student",
    "current_check",
    "OWN_WORK_MESSAGE",
    "OWN_WORK_PREFIX",
]

F = TypeVar("F", bound=Callable[..., Any])

OWN_WORK_MESSAGE = (
    "the check runs your own implementation: write it instead of calling {name}"
)
OWN_WORK_PREFIX = OWN_WORK_MESSAGE.split("{")[0].strip()  # what every refusal starts with
_COURSE_PACKAGE = "course_lib"
STUB_PREFIX = "Fill-in '"  # how the release stub's NotImplementedError message starts
_RED, _BOLD, _DIM, _RESET = "\x1b[31m", "\x1b[1m", "\x1b[2m", "\x1b[0m"


class CheckFailure(AssertionError):
    """A check that did not pass: ``message`` says what was seen, ``hint`` what to do."""

    def __init__(self, message: str, hint: str | None = None, *, check_id: str | None = None):
        self.message = message.strip()
        self.hint = hint.strip() if hint else None
        self.check_id = check_id
        super().__init__(self.text())

    def text(self) -> str:
        """The whole failure as one string (what grading and feedback files show)."""
        if self.hint:
            return f"{self.message}\nHint: {self.hint}"
        return self.message

    def _render_traceback_(self) -> list[str]:
        """What IPython shows instead of a traceback: the check's name, diagnosis and hint."""
        title = f"CHECK {self.check_id}: not passed yet" if self.check_id else "Check not passed yet"
        lines = [f"{_RED}{_BOLD}✗ {title}{_RESET}", self.message]
        if self.hint:
            lines.append(f"{_BOLD}Hint:{_RESET} {self.hint}")
        return lines


@dataclass(frozen=True)
class _Context:
    check_id: str
    forbidden: tuple[str, ...]


_CURRENT: ContextVar[_Context | None] = ContextVar("course_check", default=None)


def current_check() -> str | None:
    """The grade_id of the check that is running, or None outside a check."""
    context = _CURRENT.get()
    return None if context is None else context.check_id


def expect(condition: object, message: str, hint: str | None = None) -> None:
    """Raise :class:`CheckFailure` with ``message`` (and ``hint``) unless ``condition`` holds."""
    if not condition:
        raise CheckFailure(message, hint, check_id=current_check())


def fail(message: str, hint: str | None = None) -> NoReturn:
    """Raise :class:`CheckFailure` with ``message`` and ``hint``."""
    raise CheckFailure(message, hint, check_id=current_check())


def passed(grade_id: str) -> None:
    """Print the success line of check ``grade_id`` (the only output a passing check has)."""
    print(f"CHECK {grade_id}: PASS")


def check(grade_id: str, *, forbid: Sequence[str] = ()) -> Callable[[F], F]:
    """Decorate a check function: it runs as check ``grade_id`` and prints its success line.

    ``forbid`` lists the dotted names of the reference implementations of this exercise (e.g.
    ``"course_lib.model.lora.LoRALayer"``, ``"torch.nn.functional.scaled_dot_product_attention"``)
    that the student's code may not call while the check runs it. Any failure is re-raised as a
    :class:`CheckFailure` carrying ``grade_id`` (so it renders with the check's name); a bare
    ``AssertionError`` keeps its message.
    """
    forbidden = tuple(forbid)
    for name in forbidden:
        _resolve(name)  # a typo in a check's forbid list is the check's bug: fail loudly now

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            token = _CURRENT.set(_Context(grade_id, forbidden))
            try:
                with _refuse_references(args, kwargs, forbidden):
                    result = fn(*args, **kwargs)
            except CheckFailure as exc:
                exc.check_id = exc.check_id or grade_id
                raise exc.with_traceback(None) from None
            except AssertionError as exc:
                raise CheckFailure(str(exc) or "an assertion failed", check_id=grade_id) from None
            finally:
                _CURRENT.reset(token)
            passed(grade_id)
            return result

        run.grade_id = grade_id  # type: ignore[attr-defined]
        run.forbidden = forbidden  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate


# --------------------------------------------------------------------------------------------
# Calling the student's code
# --------------------------------------------------------------------------------------------


def call_student(
    fn: Callable[..., Any],
    *args: Any,
    what: str,
    explain: Callable[[BaseException], str | None] | None = None,
    **kwargs: Any,
) -> Any:
    """Call the student's ``fn(*args, **kwargs)`` and diagnose what goes wrong.

    ``what`` names the call for the messages, e.g. ``"LoRALayer.forward(x)"``.

    - ``NotImplementedError`` (the release stub): "``what`` is not filled in yet: fill in <name>
      above, then run this cell again".
    - Any other exception from the student's code: a :class:`CheckFailure` naming the exception,
      the student's line that raised it, and the hint ``explain(exc)`` returns (the check's
      knowledge of the likely cause, e.g. "your A has shape (r, k): x @ A needs a transpose").
    - Inside a check with a ``forbid`` list, the reference implementations are guarded while
      ``fn`` runs (module docstring).
    """
    context = _CURRENT.get()
    forbidden = context.forbidden if context else ()
    try:
        with _guarded(fn, forbidden):
            return fn(*args, **kwargs)
    except CheckFailure as exc:
        exc.check_id = exc.check_id or current_check()
        raise exc.with_traceback(None) from None
    except NotImplementedError as exc:
        if not str(exc).startswith(STUB_PREFIX):
            raise _student_error(exc, what, explain) from None
        name = what.split("(")[0].split(".")[0].strip() or what
        fail(f"{what} is not filled in yet: fill in {name} above, then run this cell again.")
    except Exception as exc:  # the student's own error: explain it instead of a raw traceback
        raise _student_error(exc, what, explain) from None


def _student_error(
    exc: BaseException, what: str, explain: Callable[[BaseException], str | None] | None
) -> CheckFailure:
    hint = explain(exc) if explain is not None else None
    where = _student_line(exc)
    message = f"{what} raised {type(exc).__name__}: {_one_line(str(exc))}"
    if where:
        message += f"\n  in your code: {where}"
    return CheckFailure(
        message,
        hint or "read the error and the line above; fix the fill-in cell, run it again, then "
                "run this check.",
        check_id=current_check(),
    )


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_course_file(filename: str) -> bool:
    here = __file__.rsplit("/", 2)[0]  # .../course_lib
    return filename.startswith(here) or "/torch/" in filename or "/site-packages/" in filename


def _student_line(exc: BaseException) -> str | None:
    """``line N: <source>`` of the innermost frame of the student's code in the traceback."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == __file__ or _is_course_file(frame.filename):
            continue
        found = frame
    if found is None:
        return None
    source = (found.line or linecache.getline(found.filename, found.lineno)).strip()
    return f"line {found.lineno}: {source}" if source else f"line {found.lineno}"


# --------------------------------------------------------------------------------------------
# The own-work guard
# --------------------------------------------------------------------------------------------


def _resolve(dotted: str) -> tuple[Any, str, Any]:
    """``(module, attribute, object)`` of a dotted name such as ``course_lib.model.lora.LoRALayer``."""
    module_name, _, attr = dotted.rpartition(".")
    module = importlib.import_module(module_name)
    return module, attr, getattr(module, attr)


def _references(obj: Any) -> Iterator[Any]:
    """``obj`` and what it wraps (functools.partial, decorators' ``__wrapped__``)."""
    seen = 0
    while obj is not None and seen < 8:
        yield obj
        seen += 1
        obj = getattr(obj, "func", None) if isinstance(obj, functools.partial) else getattr(
            obj, "__wrapped__", None
        )


@contextlib.contextmanager
def _refuse_references(args: tuple, kwargs: dict, forbidden: tuple[str, ...]) -> Iterator[None]:
    """Refuse a student object that is, wraps or subclasses a forbidden reference."""
    if forbidden:
        targets = {id(_resolve(name)[2]): name for name in forbidden}
        classes = [(o, n) for n in forbidden if inspect.isclass(o := _resolve(n)[2])]
        for value in (*args, *kwargs.values()):
            for ref in _references(value):
                name = targets.get(id(ref))
                if name is None and inspect.isclass(ref):
                    name = next((n for c, n in classes if issubclass(ref, c)), None)
                if name is not None:
                    fail(OWN_WORK_MESSAGE.format(name=name) + ".",
                         "the fill-in must contain your own code; course_lib's version is what "
                         "the check compares against.")
    yield


def _student_namespaces(fn: Any) -> list[dict]:
    """The global namespaces of the student's code reachable from ``fn`` (functions, bound
    methods, classes and their methods, instances of classes defined by the student)."""
    spaces: dict[int, dict] = {}

    def add_function(f: Any) -> None:
        f = getattr(f, "__func__", f)
        g = getattr(f, "__globals__", None)
        if isinstance(g, dict) and not g.get("__name__", "").startswith(_COURSE_PACKAGE):
            spaces[id(g)] = g

    def add_class(cls: type) -> None:
        for klass in cls.__mro__:
            if klass.__module__.startswith(("torch", "builtins", _COURSE_PACKAGE)):
                continue
            for value in vars(klass).values():
                add_function(getattr(value, "__func__", value))

    if inspect.isclass(fn):
        add_class(fn)
    elif inspect.isfunction(fn) or inspect.ismethod(fn):
        add_function(fn)
        owner = getattr(fn, "__self__", None)
        if owner is not None and not inspect.isclass(owner):
            add_class(type(owner))
    else:
        add_class(type(fn))  # a module instance or another callable object
    return list(spaces.values())


@contextlib.contextmanager
def _guarded(fn: Any, forbidden: tuple[str, ...]) -> Iterator[None]:
    """Replace every reference to a forbidden object, in course_lib's modules and the student's
    namespaces, by a guard for the duration of the block."""
    if not forbidden:
        yield
        return
    guards: dict[int, Any] = {}  # id(reference) -> its guard
    restore: dict[int, Any] = {}  # id(guard) -> the reference it stands for
    for name in forbidden:
        _, _, obj = _resolve(name)
        if id(obj) not in guards:
            guards[id(obj)] = _guard(name, obj)
            restore[id(guards[id(obj)])] = obj
    spaces = _course_namespaces()
    spaces += [vars(_resolve(name)[0]) for name in forbidden]  # e.g. torch.nn.functional
    spaces += _student_namespaces(fn)
    replaced: list[tuple[dict, str, Any]] = []
    try:
        for space in {id(s): s for s in spaces}.values():
            for key, value in list(space.items()):
                guard = guards.get(id(value))
                if guard is not None:
                    replaced.append((space, key, value))
                    space[key] = guard
        yield
    finally:
        for space, key, value in reversed(replaced):
            space[key] = value
        # A guard may also have been copied while the block ran (e.g. a lazy re-export such as
        # ``course_lib.LoRALayer`` caches what it finds): put the original back there too.
        for space in {id(s): s for s in [*spaces, *_course_namespaces()]}.values():
            for key, value in list(space.items()):
                if id(value) in restore:
                    space[key] = restore[id(value)]


def _course_namespaces() -> list[dict]:
    """The global namespaces of every imported course_lib module (but this one)."""
    return [vars(m) for n, m in list(sys.modules.items())
            if m is not None and (n == _COURSE_PACKAGE or n.startswith(_COURSE_PACKAGE + "."))
            and n != __name__]


def _guard(name: str, original: Any) -> Any:
    message = OWN_WORK_MESSAGE.format(name=name) + "."
    hint = ("the fill-in must contain your own code; use course_lib only for the helpers its "
            "docstring allows.")

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        fail(message, hint)

    if inspect.isclass(original):
        return type(original.__name__, (), {"__new__": lambda cls, *a, **k: refuse(),
                                            "__init_subclass__": classmethod(
                                                lambda cls, **k: refuse())})
    functools.update_wrapper(refuse, original, updated=())
    del refuse.__wrapped__  # the guard must not lead back to the original
    return refuse
