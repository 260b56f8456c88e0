"""What ``course grade`` runs of a notebook: only what its checks need, unless ``--full``.

Grading gives every check the same verdict when it runs the set-up cell (the first code cell),
the fill-ins and the check cells, and leaves out the cells that only demonstrate or experiment
(training sweeps, timings, figures): the checks build their own seeded inputs. The solution
notebook says which cells those are, with the cell tag ``course-experiment``
(:data:`~course_lib.instructor.protocol.EXPERIMENT_TAG`). Every untagged cell runs.

Leaving a cell out is only safe when no cell that runs reads a name it defines, so the plan is
checked from the cells' names (:func:`cell_names`, an analysis of each cell's syntax tree and
symbol table):

- ``course release`` / ``release --check`` reject a solution notebook in which a cell that runs
  reads a name whose last definition before it is in an experiment cell (:func:`plan_problems`);
- at grading time, the same analysis runs on the rebuilt notebook, with the student's fill-ins:
  an experiment cell that a student's code reads a name from runs for that student
  (:func:`grading_plan`), so the fast mode gives the verdicts of ``--full``.

What names do not show is not followed: an experiment cell that changes an object in place
(``model.load_state_dict(...)``) or global state (``torch.manual_seed``) that a check relies on.
Check functions must not rely on such state (they seed their own inputs), and the grading tests
compare the fast mode with ``--full`` on the course.

:func:`experiment_cells` is the rule ``course plan --mark`` applies: every code cell that is
not the set-up cell, a fill-in or a check, and that none of those needs.
"""

from __future__ import annotations

import ast
import functools
import symtable
from dataclasses import dataclass, field

from course_lib.instructor.protocol import (
    EXPERIMENT_TAG,
    Problem,
    grade_id_of,
    is_check_cell,
    is_experiment_cell,
    is_solution_cell,
    set_tag,
    source_of,
)

# Function scopes that run at once, where they are written (unlike a def or a lambda).
_COMPREHENSIONS = {"listcomp", "setcomp", "dictcomp", "genexpr"}


@dataclass(frozen=True)
class CellNames:
    """The global names one cell binds and reads."""

    binds: frozenset[str]  # names the cell (re)binds: assignments, imports, def, class, del
    reads: frozenset[str]  # names it reads while it runs, before it binds them itself
    deferred: frozenset[str]  # names read inside the functions it defines (when they are called)
    star: bool = False  # ``from m import *``: it may bind any name


def python_source(source: str) -> str:
    """IPython syntax (``%magic``, ``!shell``) as the Python IPython runs."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def _scan(table: symtable.SymbolTable, deferred_scope: bool, out: dict[str, set[str]]) -> None:
    """Collect the global names a nested scope reads (and binds with ``global``)."""
    for child in table.get_children():
        kind, name = child.get_type(), child.get_name()
        later = deferred_scope or (kind == "function" and name not in _COMPREHENSIONS)
        for sym in child.get_symbols():
            if sym.is_global() and sym.is_referenced():
                out["deferred" if later else "reads"].add(sym.get_name())
            if sym.is_declared_global() and sym.is_assigned():
                out["binds"].add(sym.get_name())
        _scan(child, later, out)


class _Walker:
    """Reads and binds of a cell's statements, in the order they run."""

    def __init__(self) -> None:
        self.binds: set[str] = set()
        self.reads: set[str] = set()
        self.deferred: set[str] = set()
        self.star = False

    def snippet(self, node: ast.AST) -> None:
        """A statement or expression without inner statements of ours: its symbol table."""
        table = symtable.symtable(ast.unparse(node), "<cell>", "exec")
        found: dict[str, set[str]] = {"reads": set(), "deferred": set(), "binds": set()}
        for sym in table.get_symbols():
            if sym.is_referenced():
                found["reads"].add(sym.get_name())
            if sym.is_assigned() or sym.is_imported() or sym.is_namespace():
                found["binds"].add(sym.get_name())
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            found["reads"].add(node.target.id)  # `x += 1` reads x first
        _scan(table, False, found)
        self.reads |= found["reads"] - self.binds  # read before this cell bound it
        self.deferred |= found["deferred"]
        self.binds |= found["binds"]

    def bind(self, target: ast.AST | None) -> None:
        if target is None:
            return
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                self.binds.add(node.id)
            elif isinstance(node, (ast.Attribute, ast.Subscript)):  # `x.a = ...` reads x
                self.snippet(ast.Expr(node.value))

    def statements(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.ImportFrom) and any(a.name == "*" for a in stmt.names):
                self.star = True
            elif isinstance(stmt, (ast.For, ast.AsyncFor)):
                self.snippet(ast.Expr(stmt.iter))
                self.bind(stmt.target)
                self.statements(stmt.body + stmt.orelse)
            elif isinstance(stmt, (ast.If, ast.While)):
                self.snippet(ast.Expr(stmt.test))
                self.statements(stmt.body + stmt.orelse)
            elif isinstance(stmt, (ast.With, ast.AsyncWith)):
                for item in stmt.items:
                    self.snippet(ast.Expr(item.context_expr))
                    self.bind(item.optional_vars)
                self.statements(stmt.body)
            elif isinstance(stmt, ast.Try):
                self.statements(stmt.body)
                for handler in stmt.handlers:
                    if handler.type is not None:
                        self.snippet(ast.Expr(handler.type))
                    if handler.name:
                        self.binds.add(handler.name)
                    self.statements(handler.body)
                self.statements(stmt.orelse + stmt.finalbody)
            else:
                self.snippet(stmt)


@functools.lru_cache(maxsize=4096)
def cell_names(source: str) -> CellNames:
    """The names a code cell binds and reads, in the order its statements run (the body of a
    loop counts once, as if it ran once).

    A cell that does not parse binds and reads nothing: IPython runs none of it.
    """
    try:
        tree = ast.parse(python_source(source))
    except SyntaxError:
        return CellNames(frozenset(), frozenset(), frozenset())
    walker = _Walker()
    try:
        walker.statements(tree.body)
    except SyntaxError:  # e.g. `return` outside a function: IPython stops the cell there
        pass
    return CellNames(frozenset(walker.binds), frozenset(walker.reads),
                     frozenset(walker.deferred - walker.binds), walker.star)


@dataclass(frozen=True)
class Needed:
    """An experiment cell that runs because a cell that runs reads a name it defines."""

    cell: int  # the experiment cell
    name: str
    reader: int  # the cell that reads it


@dataclass(frozen=True)
class Plan:
    """The code cells of a notebook that grading runs and those it leaves out (0-based)."""

    run: tuple[int, ...]
    skipped: tuple[int, ...]
    needed: tuple[Needed, ...] = field(default=())

    def describe(self) -> str:
        skipped = ", ".join(str(i) for i in self.skipped) or "none"
        return f"runs {len(self.run)} of {len(self.run) + len(self.skipped)} code cells " \
               f"(experiment cells left out: {skipped})"


def _core(cells: list[dict], index: int, setup: int) -> bool:
    cell = cells[index]
    return index == setup or is_solution_cell(cell) or is_check_cell(cell)


def _reaching(names: dict[int, CellNames], code: list[int], name: str, at: int) -> int | None:
    """The last code cell before ``at`` that binds ``name`` (all cells run, as in ``--full``)."""
    for index in reversed(code):
        if index < at and (name in names[index].binds or names[index].star):
            return index
    return None


def _close(cells: list[dict], code: list[int], skippable: set[int]) -> Plan:
    """Leave out ``skippable`` cells, except those a running cell reads a name from."""
    names = {i: cell_names(source_of(cells[i])) for i in code}
    skip = set(skippable)
    needed: list[Needed] = []
    changed = True
    while changed:
        changed = False
        running = [i for i in code if i not in skip]
        for reader in running:
            uses = [(name, reader) for name in sorted(names[reader].reads)]
            # a function may be called by any later cell that runs: its reads happen there
            uses += [(name, at) for name in sorted(names[reader].deferred)
                     for at in running if at >= reader]
            for name, at in uses:
                source = _reaching(names, code, name, at)
                if source is not None and source in skip:
                    skip.discard(source)
                    needed.append(Needed(source, name, reader))
                    changed = True
    return Plan(tuple(i for i in code if i not in skip), tuple(i for i in code if i in skip),
                tuple(needed))


def _code_cells(cells: list[dict]) -> list[int]:
    return [i for i, cell in enumerate(cells) if cell.get("cell_type") == "code"]


def grading_plan(cells: list[dict], full: bool = False) -> Plan:
    """The cells grading runs: all of them with ``full``; otherwise every cell but the
    experiment cells that no running cell reads a name from."""
    code = _code_cells(cells)
    if full or not code:
        return Plan(tuple(code), ())
    tagged = {i for i in code if not _core(cells, i, code[0]) and is_experiment_cell(cells[i])}
    return _close(cells, code, tagged)


def experiment_cells(cells: list[dict]) -> list[int]:
    """The code cells grading does not need: not the set-up cell, a fill-in or a check, and no
    name of theirs read by one (directly or through another needed cell)."""
    code = _code_cells(cells)
    if not code:
        return []
    return list(_close(cells, code, {i for i in code if not _core(cells, i, code[0])}).skipped)


def plan_problems(nb: dict, nb_name: str) -> list[Problem]:
    """Protocol problems of a solution notebook's experiment tags (``course release`` reports
    them): a tag where it cannot be, or a running cell that reads an experiment cell's name."""
    cells = nb.get("cells", [])
    code = _code_cells(cells)
    problems = []
    for index, cell in enumerate(cells):
        if not is_experiment_cell(cell):
            continue
        what = None
        if cell.get("cell_type") != "code":
            what = "a markdown cell never runs"
        elif index == code[0]:
            what = "the set-up cell (the first code cell) always runs"
        elif is_solution_cell(cell) or is_check_cell(cell):
            what = "fill-in and check cells always run"
        if what:
            problems.append(Problem(nb_name, index, f"tagged {EXPERIMENT_TAG!r}, but {what}: "
                                                    "remove the tag"))
    if problems:
        return problems
    for need in grading_plan(cells).needed:
        also = "" if _core(cells, need.reader, code[0]) else f", or tag cell {need.reader} too"
        problems.append(Problem(
            nb_name, need.reader,
            f"reads `{need.name}`, which experiment cell {need.cell} (tagged "
            f"{EXPERIMENT_TAG!r}) defines; grading leaves that cell out, so this cell would not "
            f"see it: remove the tag from cell {need.cell}{also}",
            grade_id_of(cells[need.reader])))
    return problems


def mark_experiments(nb: dict) -> list[int]:
    """Tag exactly the cells :func:`experiment_cells` finds (untag the others), in place;
    returns the tagged cells."""
    cells = nb.get("cells", [])
    marked = experiment_cells(cells)
    for index, cell in enumerate(cells):
        set_tag(cell, EXPERIMENT_TAG, index in marked)
    return marked
