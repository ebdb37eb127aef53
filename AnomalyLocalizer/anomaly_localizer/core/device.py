"""Device choice and batch sizing."""

from __future__ import annotations

import os

import torch

from ..errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU for "auto"; a forced device must exist."""
    if name not in DEVICES:
        raise InputError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise InputError("--device cuda was asked but no CUDA GPU is available; use --device auto or cpu")
    if name == "mps" and not mps:
        raise InputError("--device mps was asked but Apple MPS is not available; use --device auto or cpu")
    return torch.device(name)


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device (CUDA) or available system memory (CPU, MPS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def batch_size_for(device: torch.device, bytes_per_slice: int, n_slices: int, fraction: float = 0.25,
                   cap: int = 512) -> int:
    """Slices per batch so a batch takes at most ``fraction`` of the free memory."""
    budget = available_memory_bytes(device) * fraction
    return int(max(1, min(n_slices, cap, budget // max(1, bytes_per_slice))))


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


THREADS_ENV = "ANOMALY_LOCALIZER_THREADS"


def usable_cores() -> int:
    """The cores this process may run on (e.g. fewer under taskset; every core where the
    platform cannot say)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's (process-wide) thread count: ``threads``, else the number in
    ``ANOMALY_LOCALIZER_THREADS`` when the user set it, else every core the process may run
    on (torch sometimes picks fewer). Called by the command line's entry point and by a
    screening's worker processes once, never by library code on each score: a Slicer
    session or a threaded worker shares the setting. Returns the count."""
    n = usable_cores()
    if os.environ.get(THREADS_ENV, "").strip().isdigit() and int(os.environ[THREADS_ENV]) > 0:
        n = int(os.environ[THREADS_ENV])
    if threads is not None and threads > 0:
        n = int(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def float64_ok(device: torch.device) -> bool:
    """Whether ``device`` computes in float64 (Apple MPS does not)."""
    return torch.device(device).type != "mps"


def keep_freed_memory() -> bool:
    """Turn off glibc's adaptive mmap threshold for this process (as ``MALLOC_MMAP_THRESHOLD_``
    and ``MALLOC_TRIM_THRESHOLD_`` would): freed tensor memory is kept for the next step
    instead of being unmapped and page-faulted in afresh. A U-Net training step on these
    2-core CPUs spent half its time in the kernel without it, and ran 27 % faster with it.
    Returns True when set (glibc only; elsewhere nothing changes)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def cpu_has_bf16() -> bool:
    """True when this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX). Without
    them, PyTorch emulates bf16 and a U-Net training step is about ten times slower than in
    float32 (measured on an AVX2 machine), so bf16 is used only where it is fast."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
