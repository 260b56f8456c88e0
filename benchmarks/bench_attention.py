"""Attention speed and peak memory against sequence length: naive vs SDPA vs tiled (pure PyTorch).

Shapes from COURSE_DESIGN.md's performance targets: batch 1, 8 heads, head_dim 64, causal,
fp32, 2 threads, N = 256 ... 8192. For each N four implementations are timed in interleaved
rounds (minimum over rounds; this machine is noisy): ``naive_attention``, a bare
``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` call, the course's
``flash_attention_forward`` (the same SDPA call behind its input checks) and ``tiled_attention``.
Their peak extra memory is measured once (deterministic on CPU: PyTorch's allocator events).
The last lines compare the results with the targets. On a CUDA machine the same table is printed
for fp16 with SDPA restricted to the flash kernel. Prints ratios; asserts nothing.

Other busy processes: by default OpenMP threads spin while they wait for each other. When
another program holds a core, a spinning thread keeps the core its partner needs, and the tiled
loop -- hundreds of small multi-threaded ops -- slows down by up to 10x (naive and SDPA, a few
large ops, barely notice). ``--omp-wait auto`` (the default) therefore sets
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep while waiting) when the load average shows other
work, before torch is imported; ``active`` / ``passive`` force a policy.

    python benchmarks/bench_attention.py [--rounds N] [--max-n N] [--threads T]
                                         [--omp-wait auto|active|passive]
"""

from __future__ import annotations

import argparse
import os

BATCH, HEADS, HEAD_DIM = 1, 8, 64
SIZES = [256, 512, 1024, 2048, 4096, 8192]


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10,
                        help="interleaved rounds for N <= 2048, fewer above (default 10)")
    parser.add_argument("--max-n", type=int, default=8192, help="largest N (default 8192)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--omp-wait", choices=["auto", "active", "passive"], default="auto",
                        help="OpenMP wait policy; auto = passive when other processes are busy")
    return parser.parse_args()


def _set_wait_policy(choice: str) -> str:
    """Set OMP_WAIT_POLICY (must happen before torch is imported); describe what was done."""
    if "OMP_WAIT_POLICY" in os.environ:
        return f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} (from the environment)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = load > 0.5 * (os.cpu_count() or 1)
    if choice == "passive" or (choice == "auto" and busy):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        why = f", load average {load:.1f} on {os.cpu_count()} CPUs" if choice == "auto" else ""
        return f"OMP_WAIT_POLICY=PASSIVE (--omp-wait {choice}{why})"
    if choice == "active":
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    return f"OpenMP default wait policy (--omp-wait {choice}, load average {load:.1f})"


def _rounds(n: int, base: int) -> int:
    """Fewer rounds at large N, where one naive call takes seconds."""
    return base if n <= 2048 else max(3, base // 2) if n <= 4096 else max(2, base // 4)


def _run(device: str, dtype, sdpa_backend: str, sizes: list[int], base_rounds: int):
    import contextlib

    import torch
    import torch.nn.functional as F

    from course_lib.utils.benchmark import compare, peak_memory
    from course_lib.utils.flash_attention import (
        SDPA_BACKENDS,
        flash_attention_forward,
        naive_attention,
        tiled_attention,
    )
    from course_lib.utils.units import format_bytes

    def bare_sdpa(q, k, v):
        """The call the course wraps, restricted to the same kernel when one is chosen."""
        if sdpa_backend == "auto":
            kernel = contextlib.nullcontext()
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[sdpa_backend])])
        with kernel:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    rows = []
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen).to(device, dtype)
                   for _ in range(3))
        fns = {
            "naive": lambda q=q, k=k, v=v: naive_attention(q, k, v, causal=True),
            "sdpa": lambda q=q, k=k, v=v: bare_sdpa(q, k, v),
            "course": lambda q=q, k=k, v=v: flash_attention_forward(q, k, v, causal=True,
                                                                     backend=sdpa_backend),
            "tiled": lambda q=q, k=k, v=v: tiled_attention(q, k, v, causal=True),
        }
        with torch.no_grad():
            err = {name: (fn() - fns["naive"]()).abs().max().item()
                   for name, fn in fns.items() if name != "naive"}
            times = compare(fns, repeat=_rounds(n, base_rounds), warmup=1)
            mem = {name: peak_memory(fn, device) for name, fn in fns.items()}
        rows.append((n, times, mem, err))
        t = {name: times[name].min for name in fns}
        print(
            f"{n:>6} | {t['naive'] * 1e3:9.1f} {t['sdpa'] * 1e3:8.1f} {t['course'] * 1e3:8.1f} "
            f"{t['tiled'] * 1e3:8.1f} | {t['naive'] / t['sdpa']:10.2f}x "
            f"{t['course'] / t['sdpa']:12.3f}x {t['naive'] / t['tiled']:11.2f}x | "
            f"{format_bytes(mem['naive'], 'binary'):>10} {format_bytes(mem['sdpa'], 'binary'):>10} "
            f"{format_bytes(mem['tiled'], 'binary'):>10} | "
            f"{100 * mem['tiled'] / mem['naive']:9.2f}% "
            f"| {max(err.values()):.1e}",
            flush=True,
        )
    return rows


def _header(title: str) -> None:
    print(title)
    print(f"{'N':>6} | {'time ms: naive':>14} {'sdpa':>8} {'course':>8} {'tiled':>8} | "
          f"{'naive/sdpa':>11} {'course/sdpa':>13} {'naive/tiled':>12} | {'peak: naive':>10} "
          f"{'sdpa':>10} {'tiled':>10} | {'tiled/naive':>10} | max |diff|")
    print("  (course = flash_attention_forward, sdpa = a bare F.scaled_dot_product_attention call)")


def _summary(rows, label: str) -> None:
    from course_lib.utils.benchmark import growth_exponent
    from course_lib.utils.units import format_bytes

    sizes = [n for n, *_ in rows]
    print("  peak memory per doubling of N (4x = quadratic, 2x = linear, below 2x = linear plus "
          "a constant tile):")
    for name in ("naive", "sdpa", "tiled"):
        peaks = [mem[name] for _, _, mem, _ in rows]
        factors = " ".join(f"{b / a:4.2f}x" for a, b in zip(peaks, peaks[1:]))
        # Bytes added per extra token between the last two sizes: constant for linear growth.
        per_token = (peaks[-1] - peaks[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else 0
        exponent = growth_exponent(sizes[-2:], peaks[-2:]) if len(sizes) > 1 else float("nan")
        print(f"    {name:<5} {factors}   (last step: N^{exponent:.2f}, "
              f"{format_bytes(per_token, 'binary')} per extra token)")
    slower = [n for n, times, *_ in rows if n >= 1024 and times["sdpa"].min >= times["naive"].min]
    print(f"  {label} faster than naive for every N >= 1024: "
          f"{'yes' if not slower else 'NO, not at N = ' + str(slower)}")
    by_n = {n: (times, mem) for n, times, mem, _ in rows}
    print("  targets (COURSE_DESIGN.md):")
    for n, (times, mem) in by_n.items():
        if n not in (4096, 8192):
            continue
        course = times["course"].min / times["sdpa"].min
        tiled = times["naive"].min / times["tiled"].min
        share = mem["tiled"] / mem["naive"]
        print(f"    N={n}: flash_attention_forward / bare SDPA {course:.3f}x (target <= 1.10x), "
              f"naive / tiled {tiled:.2f}x (target >= 3x at 4096), tiled peak {share:.2%} of "
              f"naive's (target <= 5 % at 8192)")


def main() -> None:
    args = _parse_args()
    policy = _set_wait_policy(args.omp_wait)

    import inspect

    import torch

    from course_lib.utils.flash_attention import (
        sdpa_backend_support,
        sdpa_selected_backend,
        tiled_attention,
    )

    torch.set_num_threads(args.threads)
    sizes = [n for n in SIZES if n <= args.max_n]
    defaults = inspect.signature(tiled_attention).parameters
    blocks = (f"{defaults['block_q'].default} x {defaults['block_k'].default} "
              "(q x k, query blocks outside)")
    q = torch.randn(BATCH, HEADS, 256, HEAD_DIM)
    kernel = sdpa_selected_backend(q, q, q)
    _header(f"Attention benchmark, CPU: B={BATCH}, H={HEADS}, d={HEAD_DIM}, causal, fp32, "
            f"{torch.get_num_threads()} threads, PyTorch {torch.__version__}, {policy}; SDPA "
            f"picks its '{kernel}' kernel; tiled blocks {blocks}; time = min over interleaved "
            "rounds, peak = extra bytes allocated")
    rows = _run("cpu", torch.float32, "auto", sizes, args.rounds)
    _summary(rows, "SDPA")

    if torch.cuda.is_available():
        q = torch.randn(BATCH, HEADS, 256, HEAD_DIM, device="cuda", dtype=torch.float16)
        support = sdpa_backend_support(q, q, q)
        backend = "flash" if support["flash"] == "ok" else "auto"
        print()
        _header(f"CUDA ({torch.cuda.get_device_name()}), fp16, SDPA backend '{backend}' "
                f"(flash kernel: {support['flash']})")
        rows = _run("cuda", torch.float16, backend, sizes, args.rounds)
        _summary(rows, f"SDPA ({backend})")
    else:
        print("\n(no CUDA GPU: the flash-kernel table is printed on a GPU machine)")


if __name__ == "__main__":
    main()
