"""dmoe.startup.allocator: the DMOE_MALLOC modes (the memory bound:
tests/system/test_resident_memory.py)."""

import logging
import platform
import threading

import pytest

from dmoe.startup.allocator import tune_allocator

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


def test_modes(caplog):
    assert tune_allocator({"DMOE_MALLOC": "system"}) == "system"
    with caplog.at_level(logging.WARNING):
        assert tune_allocator({"DMOE_MALLOC": "jemalloc"}) == "system"
    assert "DMOE_MALLOC=jemalloc: not one of ('trim', 'mmap', 'system')" in caplog.text
    before = {t.name for t in threading.enumerate()}
    assert tune_allocator({}) == "trim"  # the default
    assert "dmoe-malloc-trim" in {t.name for t in threading.enumerate()} - before


def test_glibc_variables_win_unless_dmoe_malloc_is_set():
    assert tune_allocator({"MALLOC_ARENA_MAX_": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}) == "system"
    assert tune_allocator({"MALLOC_TRIM_THRESHOLD_": "0", "DMOE_MALLOC": "mmap"}) == "mmap"
