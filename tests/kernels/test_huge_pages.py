"""loom.kernels.memory.back_with_huge_pages: large anonymous weights are moved onto 2 MiB pages in place, nothing
else changes (values, addresses), file-backed and small tensors are left alone, and it never fails a load."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import safe_open, save_file

from loom.kernels import memory


def _anon_huge_kb(ptr: int) -> int | None:
    """AnonHugePages (kB) of the mapping holding `ptr`, from /proc/self/smaps."""
    current = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = lo <= ptr < hi
            elif current and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return None


def test_values_and_addresses_are_unchanged(tmp_path):
    big = torch.randn(4096, 1024)  # 16 MiB
    half = torch.randn(2048, 2048).to(torch.bfloat16)
    small = torch.randn(16, 16)
    view = big[:, ::2]  # a strided view of a storage already in the list
    save_file({"w": torch.randn(2048, 1024)}, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        mapped = f.get_tensor("w")
    tensors = [big, half, small, view, mapped, torch.nn.Parameter(torch.randn(1024, 2048)), "not a tensor", None]
    before = [(t.clone(), t.data_ptr()) for t in tensors if isinstance(t, torch.Tensor)]
    advised = memory.back_with_huge_pages(tensors)
    assert advised >= 0
    after = [t for t in tensors if isinstance(t, torch.Tensor)]
    for (value, ptr), t in zip(before, after):
        assert t.data_ptr() == ptr
        assert torch.equal(t, value)


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("LOOM_HUGE_PAGES", "off")
    assert memory.back_with_huge_pages([torch.randn(4096, 1024)]) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_large_anonymous_tensor_lands_on_huge_pages():
    if memory._thp_mode() == "never":
        pytest.skip("transparent huge pages are off on this machine (mode 'never')")
    t = torch.empty(8 << 20, dtype=torch.uint8)
    t.fill_(1)  # faulted in as ordinary pages first, as weights written at load are
    advised = memory.back_with_huge_pages([t])
    assert advised >= 2 << 20
    aligned = (t.data_ptr() + (2 << 20) - 1) & ~((2 << 20) - 1)  # madvise splits the mapping at the 2 MiB bounds
    huge = _anon_huge_kb(aligned)
    release = tuple(int(x) for x in __import__("platform").release().split(".")[:2] if x.isdigit())
    if release < (6, 1):
        pytest.skip("MADV_COLLAPSE needs Linux 6.1; older kernels only advise future faults")
    assert huge is not None and huge >= 2048, f"AnonHugePages {huge} kB after MADV_COLLAPSE"
    assert int(t.sum()) == t.numel()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_neighbouring_small_storages_are_advised_as_one_range():
    # a model's matrices are mostly smaller than a huge page: eight 1 MiB storages side by side (separate storages
    # over one anonymous mapping) must get huge pages together, which advising each alone can never give
    import mmap

    if memory._thp_mode() == "never":
        pytest.skip("transparent huge pages are off on this machine (mode 'never')")
    area = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(area)
    parts = [torch.frombuffer(view[i << 20:(i + 1) << 20], dtype=torch.uint8) for i in range(8)]
    for i, p in enumerate(parts):
        p.fill_(i + 1)
    assert len({p.untyped_storage().data_ptr() for p in parts}) == 8
    assert memory.back_with_huge_pages(parts) >= 4 << 20  # at least two whole 2 MiB pages inside the 8 MiB
    assert all(int(p[0]) == i + 1 and int(p[-1]) == i + 1 for i, p in enumerate(parts))
    del parts, p
