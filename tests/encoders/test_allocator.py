"""The encoder process's allocator keeps a forward's freed memory for the next batch."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A forward's pattern: blocks allocated, written and freed, batch after batch: a few MiB (a
# text tower's) and 100 MiB (a CNN stem's on 64 images, past glibc's largest mmap threshold).
CYCLES = """
import json, resource, sys
import numpy as np
sys.path.insert(0, {repo!r})
from encoders.core.allocator import keep_freed_memory
took = keep_freed_memory() if {tune} else None
def batch():
    blocks = [np.ones(n, dtype=np.float32) for n in {sizes}]
    return sum(float(b[-1]) for b in blocks)
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({batches}):
    batch()
print(json.dumps({{"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""


SMALL = [1 << 20, 3 << 19, 3 << 20] * 3  # float32s: 4, 6, 12 MiB x 3
BIG = [25 << 20]  # 100 MiB
HUGE = [5 << 24] * 4  # 4 x 320 MiB = 1.25 GiB, freed at once at the end of each batch


def faults(tune: bool, sizes: list[int] = SMALL, batches: int = 40) -> dict:
    code = CYCLES.format(repo=str(REPO), tune=tune, sizes=sizes, batches=batches)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    plain, tuned = faults(False), faults(True)
    assert tuned["took"] is True
    # 40 batches of 66 MiB: glibc gives the freed heap top back to the system after each batch
    # and faults every page in again the next (~17,000 pages); kept, the same pages serve every batch.
    assert plain["faults"] > 40 * 2_000, plain
    assert tuned["faults"] < plain["faults"] / 20, (plain, tuned)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_blocks_past_the_largest_mmap_threshold_are_reused_too():
    plain, tuned = faults(False, BIG), faults(True, BIG)
    assert tuned["took"] is True
    # Mapped and unmapped each batch unless mmap is off: at least one fault per 2 MiB page
    # (50 a batch where transparent huge pages back it; 25,600 4 KiB pages where none do).
    assert plain["faults"] > 40 * 50, plain
    assert tuned["faults"] < plain["faults"] / 20, (plain, tuned)


def test_encoder_actor_sets_it_before_loading(monkeypatch):
    calls = []
    import encoders.core.allocator as allocator

    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("allocator") or True)
    from pipeline import stages

    class Stop(Exception):
        pass

    def pick_device():
        calls.append("device")
        raise Stop

    monkeypatch.setattr("encoders.core.device.pick_device", pick_device)
    with pytest.raises(Stop):
        stages.EncodeActor(spec=None, threads=1, max_tokens=1)
    assert calls == ["allocator", "device"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_batch_that_frees_over_a_gib_keeps_its_pages():
    """The heap's top is trimmed once that much is free: a threshold under a batch's peak gives
    it back after every batch (one fault per page, or per 2 MiB huge page, each time)."""
    tuned = faults(True, HUGE, batches=3)
    assert tuned["took"] is True
    assert tuned["faults"] < 3 * 640 / 20, tuned  # 640 huge pages a batch if they were faulted again
