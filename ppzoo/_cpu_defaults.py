"""Threading defaults for Paddle on CPU, applied before Paddle is imported.

Paddle's CPU wheel uses MKL, which runs one thread by default and takes a slow code path on AMD processors
unless MKL_DEBUG_CPU_TYPE=5 is set; together they make matrix products up to 4x faster here. MKL reads the
variables when it loads, so they must be in the environment before the first `import paddle`. A value the
user already set is always kept. Under `paddle.distributed.launch` the cores are shared between the
processes of a node (PADDLE_LOCAL_SIZE of them), so each gets its share rather than all of them.
"""
import contextlib
import io
import ctypes
import ctypes.util
import os
import platform
import sys
import warnings

_DEFAULTS_APPLIED = {}

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory():
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    Paddle's CPU allocator mallocs every tensor; glibc serves large blocks with fresh mmap pages and unmaps
    them on free, so each activation of a few MB is page-faulted in anew. Measured on a 2M-element add:
    3.1 ms by default, 0.4-0.6 ms with these settings (softmax 7.3 -> 2.5-3.7 ms); a training step of tiny
    ChuXin runs about 1.5x faster. Applies only where the C library is glibc (Linux); elsewhere a no-op.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    # Child processes (data loaders, launched workers) read the same settings from the environment.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 30))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str((1 << 31) - 1))
    return ok


def _is_cpu_only_paddle():
    """Whether the installed Paddle wheel is the CPU build (read from package metadata: Paddle itself must
    not be imported before its FLAGS_ and MKL variables are set)."""
    from importlib import metadata

    names = ("paddlepaddle-gpu",)
    for name in names:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return False
    return True


def apply_cpu_defaults():
    # Paddle warns at import about a compiler cache that only its C++ extension builder would use.
    warnings.filterwarnings("ignore", message="No ccache found")
    if os.environ.get("PPZOO_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()
    if "paddle" in sys.modules:
        return dict(_DEFAULTS_APPLIED)  # too late to change MKL's mind
    if _is_cpu_only_paddle():
        # Paddle 3 makes transpose and friends return strided views (FLAGS_use_stride_kernel). On CPU every
        # later elementwise kernel or gradient that meets a view takes a slow strided path (measured: RoPE's
        # backward 9 ms instead of 0.7 ms per call), costing more than the copy the view saved: tiny ChuXin
        # trains about 15% faster per step without views. Paddle reads FLAGS_* at import; GPU builds keep
        # the default.
        wanted_flags = {"FLAGS_use_stride_kernel": "0"}
    else:
        wanted_flags = {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = max(1, int(os.environ.get("PADDLE_LOCAL_SIZE", "1") or 1))
    threads = max(1, cores // local_processes)
    wanted = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MKL_DEBUG_CPU_TYPE": "5",
              **wanted_flags}
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = value
            _DEFAULTS_APPLIED[key] = value
    return dict(_DEFAULTS_APPLIED)


# Paddle's bootstrap prints this to stderr on import whenever OMP_NUM_THREADS > 1, which the defaults above
# set on purpose. It is about OpenBlas builds and GPU data parallelism, not this CPU/MKL setup, and it would
# precede every tool's output (including the one-paragraph error message of a failed command).
_PADDLE_OMP_WARNING = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")


def import_paddle_quietly():
    """Import paddle without its OMP_NUM_THREADS warning; anything else it prints to stderr is kept."""
    if "paddle" in sys.modules:
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            import paddle  # noqa: F401
    finally:
        kept = [line for line in captured.getvalue().splitlines(True) if not line.startswith(_PADDLE_OMP_WARNING)]
        sys.stderr.write("".join(kept))

