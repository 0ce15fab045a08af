"""Whether this CPU computes bf16 natively, and the one warning `--amp bf16` gives where it does not.

bf16 pays on the CPU only with native bf16 dot products: AVX512-BF16 (`avx512_bf16` in /proc/cpuinfo;
Cooper Lake, Sapphire Rapids, AMD Zen 4 and later) or AMX (`amx_bf16`, Sapphire Rapids and later).
Elsewhere the bf16 arithmetic is emulated with fp32 instructions plus conversions (by oneDNN on AVX-512 CPUs,
by ATen's kernels on AVX2-only ones such as AMD Zen 3, for which oneDNN has no bf16 path), slower than fp32:
`--amp bf16` still works there, but the CLI says so once.
`torch.backends.cpu.get_cpu_capability()` names the vector width PyTorch's kernels use ("AVX512",
"AVX2", ...) but not the bf16 extensions, so the flags are read from /proc/cpuinfo (Linux).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

__all__ = ["cpu_bf16_support", "warn_if_bf16_slow", "BF16_FLAGS"]

BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_warned = False


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, None where there is no such file (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_support() -> dict:
    """{"native": bool | None, "flags": [...], "capability": str, "summary": str}; native None = unknown."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    found = sorted(f for f in BF16_FLAGS if flags is not None and f in flags)
    native = None if flags is None else bool(found)
    if native:
        summary = f"native bf16 ({', '.join(found)}; PyTorch kernels {capability})"
    elif native is None:
        summary = f"unknown (no /proc/cpuinfo; PyTorch kernels {capability})"
    else:
        summary = f"no native bf16 (no {' / '.join(BF16_FLAGS)} in /proc/cpuinfo; PyTorch kernels {capability})"
    return {"native": native, "flags": found, "capability": capability, "summary": summary}


def warn_if_bf16_slow(amp: str | None, device=None) -> bool:
    """Print, once per process, that `--amp bf16` on a CPU without native bf16 runs slower than fp32.

    `device`: a torch.device or its name; None / "auto" mean CUDA when available, else the CPU (as the CLI).
    Returns whether it warned (now or before)."""
    global _warned
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if amp != "bf16" or torch.device(device).type != "cpu":
        return False
    if _warned:
        return True
    support = cpu_bf16_support()
    if support["native"] is not False:
        return False
    _warned = True
    print(f"warning: --amp bf16 on a CPU without native bf16 ({support['summary']}): the bf16 products are "
          "emulated, so this runs slower than fp32 (--amp none) and only saves memory", file=sys.stderr, flush=True)
    return True
