"""glibc malloc tuning: it takes effect (no page faults for re-allocated tensor memory), checks its arguments,
stays out of the way of a preloaded allocator, and the CLI applies it unless told not to."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hybridzoo.engine import cpu_memory
from hybridzoo.engine.cpu_memory import GLIBC_HEAP_MAX, GLIBC_MMAP_THRESHOLD_MAX, allocator_in_use, tune_glibc_malloc

glibc_only = pytest.mark.skipif(cpu_memory._glibc() is None, reason="the C library is not glibc")

# Three 24 MiB blocks malloc'd, written and freed four times (straight through the C library, so that no other
# allocation lands between them), on the main thread or on another one (whose arena is made of heaps of at most
# 64 MiB, so the three blocks span two of them); the page faults of the last round on that thread. Untuned glibc
# returns the freed top of the heap to the kernel each round once it exceeds twice the largest block it has mmap'd;
# another thread's arena unmaps its wholly free heap each round unless the top pad keeps it.
_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys, threading
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
    mode, where = sys.argv[1], sys.argv[2]
    if mode != "default":
        from hybridzoo.engine.cpu_memory import tune_glibc_malloc
        # "glibc-pad": the thresholds raised, the top pad left at glibc's own 128 KiB
        assert tune_glibc_malloc(**({"top_pad": 128 << 10} if mode == "glibc-pad" else {})) is not None
    n = 24 << 20
    def one_round():
        blocks = [libc.malloc(n) for _ in range(3)]
        for p in blocks:
            libc.memset(p, 1, n)
        for p in reversed(blocks):
            libc.free(p)
    faults = []
    def measure():
        for _ in range(3):
            one_round()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        one_round()
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    if where == "thread":
        t = threading.Thread(target=measure)
        t.start()
        t.join()
    else:
        measure()
    print(faults[0])
""")


def _faults(mode: str, where: str = "main") -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode, where], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_glibc_reuses_freed_tensor_memory_without_page_faults():
    # untuned, at least two of the blocks (12,288 pages) are returned to the kernel and faulted back in
    assert _faults("default") > 8192
    assert _faults("tuned") < 256


@glibc_only
def test_tuned_glibc_keeps_the_heaps_of_other_threads():
    # the batch split's second thread: raised thresholds alone still lose one block (6,144 pages) per round
    assert _faults("glibc-pad", "thread") > 4096
    assert _faults("tuned", "thread") < 256


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)


@glibc_only
def test_tune_reports_its_settings_and_is_idempotent(fresh):
    first = tune_glibc_malloc()
    assert first["mmap_threshold"] == GLIBC_MMAP_THRESHOLD_MAX and first["trim_threshold"] == 1 << 30
    assert first["top_pad"] == GLIBC_HEAP_MAX == 64 << 20
    assert first["allocator"].startswith("glibc ")
    assert tune_glibc_malloc(mmap_threshold=1 << 20) == first  # the first call's settings stand
    assert allocator_in_use().endswith("(mallopt-tuned)")


@pytest.mark.parametrize("kwargs, match", [
    ({"mmap_threshold": 64 * 1024 * 1024}, "above glibc's maximum"),
    ({"mmap_threshold": 0}, "mmap_threshold must be a positive number of bytes"),
    ({"trim_threshold": -5}, "trim_threshold must be a positive number of bytes"),
    ({"trim_threshold": 1.5}, "trim_threshold must be a positive number of bytes"),
    ({"top_pad": 0}, "top_pad must be a positive number of bytes"),
])
def test_bad_settings_are_refused(fresh, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tune_glibc_malloc(**kwargs)


def test_a_preloaded_allocator_is_left_alone(fresh, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert tune_glibc_malloc() is None
    assert cpu_memory._applied is None
    assert allocator_in_use() == "jemalloc"


def test_cli_tunes_by_default_and_not_when_told(fresh, monkeypatch):
    from hybridzoo import cli

    calls = []
    monkeypatch.setattr(cpu_memory, "tune_glibc_malloc", lambda: calls.append(1))
    monkeypatch.setattr(cli, "cmd_bench", lambda args: 0)  # only the wiring is under test here
    assert cli.main(["bench", "cvt_tiny_demo"]) == 0
    assert calls == [1]
    assert cli.main(["--malloc", "default", "bench", "cvt_tiny_demo"]) == 0
    monkeypatch.setenv("HYBRIDZOO_MALLOC", "default")
    assert cli.main(["bench", "cvt_tiny_demo"]) == 0
    assert calls == [1]


def test_cli_names_a_bad_environment_setting(monkeypatch, capsys):
    from hybridzoo import cli

    monkeypatch.setenv("HYBRIDZOO_MALLOC", "jemalloc")
    assert cli.main(["list"]) == 2
    assert "HYBRIDZOO_MALLOC='jemalloc': expected 'tuned' or 'default'" in capsys.readouterr().err
