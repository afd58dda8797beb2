"""The allocator setting training processes make (runtime.keep_freed_memory)."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from echolm.runtime import keep_freed_memory
assert keep_freed_memory()
counts = []
for _ in range(8):  # what a training step does: the same activations, freed and made again
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    big = torch.ones(12 << 20)  # 48 MiB: above glibc's largest mmap threshold (32 MiB)
    ts = [torch.ones(n << 18) for n in (2, 5, 3, 8, 4, 6, 1, 7) * 3]  # 1-8 MiB, ~108 MiB
    del big, ts
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(counts)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_freed_activations_are_reused_without_new_page_faults():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    counts = eval(r.stdout)
    pages = ((12 << 20) + (81 << 18)) * 4 // 4096  # 39,168 pages of 4 KiB made each time
    assert counts[0] > pages // 2, counts  # the first time the pages are new
    # from the fifth time on, freed pages are reused (glibc's defaults here trimmed and
    # faulted again: [40008, 39926, 31970, 13824, 0, 4320, 0, 4576])
    assert sum(counts[4:]) <= 2048, counts
