"""The scheduler gives its C heap's free pages back (managers/heap_trim.py, issue 28 item 4)."""

from __future__ import annotations

import ctypes

import psutil
import pytest

from faser_sgl.managers.heap_trim import HeapTrimmer


def test_trims_once_when_idle_after_work_and_on_the_interval_while_busy():
    trimmer = HeapTrimmer(interval_s=3600.0)
    assert trimmer.available  # glibc on this machine
    trimmer.on_idle()
    assert trimmer.num_trims == 0  # nothing ran since the start
    trimmer.after_step()
    assert trimmer.num_trims == 0  # busy, interval not reached
    trimmer.on_idle()
    trimmer.on_idle()
    assert trimmer.num_trims == 1  # once per idle spell
    busy = HeapTrimmer(interval_s=0.0)
    busy.after_step()
    busy.after_step()
    assert busy.num_trims == 2
    assert HeapTrimmer(enabled=False).available is False


def test_a_trim_returns_freed_heap_pages_to_the_system():
    """Blocks below the mmap threshold freed between live ones stay resident until trimmed."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024  # below glibc's initial 128 KiB mmap threshold: served from the heap
    blocks = [libc.malloc(block) for _ in range(2048)]  # 128 MiB
    for b in blocks:
        ctypes.memset(b, 1, block)  # make them resident
    for b in blocks[:-1:2] + blocks[1:-1:2]:
        libc.free(b)  # everything but the last block, which pins the heap's top
    process = psutil.Process()
    before = process.memory_info().rss
    HeapTrimmer().trim()
    after = process.memory_info().rss
    libc.free(blocks[-1])
    assert before - after > 64 * 2**20, (before / 2**20, after / 2**20)
