"""Wall time of each solution notebook under nbval, against the course's time budget.

    python benchmarks/time_notebooks.py                  # every notebook in solutions/
    python benchmarks/time_notebooks.py solutions/02_lora_finetuning.ipynb --repeat 3

Runs ``pytest --nbval`` on one notebook at a time (as ``make test`` runs them, in a fresh
kernel each), one after the other, and prints a table: wall time, whether nbval passed, and the
budget (90 s a notebook, 5 minutes for the course, on 2 CPU cores). With ``--repeat N`` each
notebook runs N times, interleaved, and the table shows the fastest run (the one least disturbed
by other programs) and the slowest. It also shows the CPU time (user + sys of pytest and the
notebook's kernel): a notebook that trains on one thread takes about its CPU time on a quiet
machine, whatever the load was while it was measured. This is a benchmark, not a test: on a
shared machine the wall times are upper bounds, and nothing here fails because of them (the
exit status is nbval's).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_BUDGET_S = 90.0
COURSE_BUDGET_S = 300.0
NBVAL = ["--nbval", "--nbval-current-env", "--nbval-sanitize-with", "nbval_sanitize.cfg",
         "--nbval-cell-timeout=300", "-q", "-p", "no:cacheprovider"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children and their children
    return usage.ru_utime + usage.ru_stime


def run_once(notebook: Path) -> tuple[float, float, bool, str]:
    """``(wall s, CPU s, passed, pytest's last line)`` of one nbval run of ``notebook``."""
    cpu = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *NBVAL, str(notebook)],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ),
    )
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else proc.stderr.strip()[-200:]
    return seconds, _children_cpu() - cpu, proc.returncode == 0, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="solution notebooks (default: solutions/[0-9][0-9]_*.ipynb)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per notebook (default 1)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be a positive int, got {args.repeat}")
    notebooks = args.notebooks or sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
    missing = [str(nb) for nb in notebooks if not Path(nb).is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")

    times: dict[Path, list[float]] = {nb: [] for nb in notebooks}
    cpu: dict[Path, list[float]] = {nb: [] for nb in notebooks}
    failures: dict[Path, str] = {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for _ in range(args.repeat):  # interleaved: notebook 1, 2, ..., then again
        for nb in notebooks:
            seconds, cpu_seconds, passed, summary = run_once(nb)
            times[nb].append(seconds)
            cpu[nb].append(cpu_seconds)
            if not passed:
                failures[nb] = summary
            print(f"  {Path(nb).name}: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU "
                  f"({'passed' if passed else 'FAILED'})", file=sys.stderr, flush=True)

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"nbval time per notebook ({os.cpu_count()} CPU cores, load average {load:.1f} before "
          f"and {load_after:.1f} after; {args.repeat} run(s) each, min = least disturbed run)")
    print("| notebook | wall min (s) | wall max (s) | CPU (s) | budget (wall) | nbval |")
    print("|---|---:|---:|---:|---|---|")
    for nb, ts in times.items():
        within = "ok" if min(ts) <= NOTEBOOK_BUDGET_S else f"OVER {NOTEBOOK_BUDGET_S:.0f} s"
        status = "FAILED: " + failures[nb] if nb in failures else "passed"
        print(f"| {Path(nb).stem} | {min(ts):.1f} | {max(ts):.1f} | {min(cpu[nb]):.1f} | "
              f"{within} | {status} |")
    total = sum(min(ts) for ts in times.values())
    within = "ok" if total <= COURSE_BUDGET_S else f"OVER {COURSE_BUDGET_S:.0f} s"
    print(f"| **course** | **{total:.1f}** | {sum(max(ts) for ts in times.values()):.1f} | "
          f"{sum(min(c) for c in cpu.values()):.1f} | {within} | {len(failures)} failed |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
