"""A loaded worker keeps the memory its calls free for the next calls (workers.runtime.memory.keep_freed_memory):
glibc's malloc would otherwise give it back to the kernel and take it again as fresh zeroed pages, a page fault
for each 4 KiB, at every denoising iteration. Counted with the process's own page-fault counter (getrusage),
in a fresh Python process each, since malloc's settings are the whole process's."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from workers.runtime.memory import MALLOC_TUNING, keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds")

# A cycle of rounds, each allocating blocks of a few sizes (MiB), writing every page and freeing them: an
# iteration's activations, in small, as their sizes change with the batch. Prints the page faults of the last
# six rounds, once plain malloc's own adaptive thresholds have had the first six to settle.
FAULTS_SCRIPT = """
import resource, sys
import torch

if sys.argv[1] == "worker":
    from workers.config import OmniDiffusionConfig
    from workers.worker import WorkerWrapperBase

    WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny", device="cpu")).initialize()

cycle = [[12] * 5, [25] * 2, [3]]
faults = []
for round_index in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(mib * 2**18) for mib in cycle[round_index % len(cycle)]]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[6:]))
"""
PAGES_OF_A_ROUND = 60 * 2**20 // 4096  # the largest round's


# glibc's own starting thresholds (128 KiB each), held fixed. Left adaptive, plain malloc's thresholds depend on
# every allocation before the rounds and on the address layout: its faults over the last rounds varied from 0 to
# 28,640 from run to run here, so the control pins where glibc starts.
GLIBC_DEFAULT_THRESHOLDS = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def page_faults_of_the_last_rounds(mode: str, malloc_settings: dict[str, str] | None = None) -> int:
    environment = {key: value for key, value in os.environ.items() if key not in MALLOC_TUNING}
    environment.update(malloc_settings or {})
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


def test_a_loaded_worker_reuses_freed_memory_where_plain_malloc_takes_fresh_pages_each_round():
    # Without the worker, at glibc's default thresholds, the rounds' memory goes back to the kernel and comes again
    # as fresh pages: the case the worker's settings exist for, and what the counter sees of it.
    assert page_faults_of_the_last_rounds("plain", GLIBC_DEFAULT_THRESHOLDS) > PAGES_OF_A_ROUND
    # After a worker has loaded its model, the rounds reuse the pages of those before.
    assert page_faults_of_the_last_rounds("worker") < PAGES_OF_A_ROUND // 10


def test_the_users_own_malloc_tuning_is_left_in_force(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(2**20))
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert keep_freed_memory() is False
