"""Returning freed heap memory to the OS (ctypes lives only in loom.kernels)."""
from __future__ import annotations

import ctypes
import sys


def release_freed_memory() -> None:
    """Return heap memory freed while quantizing to the OS (glibc only).

    Quantizing on load allocates and frees a float copy and temporaries per weight. glibc serves those from its
    heap once its adaptive mmap threshold has grown, and keeps the freed pages: measured on the bench's 142M Llama,
    int8 resident memory was 796 MB after loading against 247 MB of tensors, and 262 MB after `malloc_trim(0)`.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim(0)


_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_HUGE = 1 << 21


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "never"


def _file_backed_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (mmap'd checkpoints, shared memory): left as they are."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 5 and fields[4] != "0":
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


def huge_pages_usable() -> bool:
    """Whether loom may ask for transparent huge pages here: Linux, THP not "never", and `LOOM_HUGE_PAGES` not off."""
    import os

    if not sys.platform.startswith("linux") or os.environ.get("LOOM_HUGE_PAGES", "").lower() in ("0", "off", "no"):
        return False
    return _thp_mode() != "never"


_MERGE_GAP = 64 << 10  # allocations this close (malloc headers, page rounding) are advised as one range


def back_with_huge_pages(tensors, min_bytes: int = 64 << 10) -> int:
    """Ask Linux to back the CPU tensors among `tensors` (model weights made at load: read, cast, quantized or
    copied, so anonymous memory) with 2 MiB pages, in place (`MADV_COLLAPSE`; the addresses stay the same).

    Why: with transparent huge pages in "madvise" mode (a common default) such memory gets 4 KiB pages, and a decode
    step, which streams every weight once, reads it 1.6-1.75x slower than the same bytes in huge pages (measured on
    the 2-core EPYC VM: a 154 MB fp32 head, torch.sum 8.3 vs 5.0 ms, loom's 1-row product 9.7 vs 5.8 ms). Most of a
    model's matrices are smaller than a huge page (a 768x768 bf16 projection is 1.2 MB), so storages that lie next
    to each other (consecutive allocations) are advised as one range: a huge page may hold parts of two weights.
    Memory mapped from files is left alone. Best effort: any refusal (another OS, an old kernel, THP "never",
    `LOOM_HUGE_PAGES=off`) leaves the memory as it was. Returns the bytes advised."""
    import torch

    if not huge_pages_usable():
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    ranges, seen = [], set()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if size < min_bytes or start in seen or start == 0:
            continue
        seen.add(start)
        ranges.append((start, start + size))
    if not ranges:
        return 0
    files = _file_backed_ranges()
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if any(a < hi and lo < b for a, b in files):
            continue
        if merged and lo - merged[-1][1] <= _MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    advised = 0
    for start, end in merged:
        lo, hi = (start + _HUGE - 1) & ~(_HUGE - 1), end & ~(_HUGE - 1)
        if hi <= lo:
            continue
        if madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0:
            madvise(lo, hi - lo, _MADV_COLLAPSE)  # may fail (busy, old kernel): the pages fault in as before
            advised += hi - lo
    return advised


def gather_small_buffers(model, min_bytes: int = 64 << 10) -> int:
    """Move `model`'s CPU buffers of `min_bytes` up to a huge page (quantized Linears' int8 and int4 weights, which
    are buffers and never trained) into one buffer, in module order, advised for 2 MiB pages; returns the bytes moved.

    Why: a weight made at load is its own allocation, and one smaller than a huge page gets none of its own (the
    advised range is the 2 MiB-aligned part inside it); between two of them lie the allocator's other blocks, so
    `back_with_huge_pages` cannot join them either. Gathered, a decode step streams them from huge pages, in the order
    it reads them (measured on the bench's 153M Llama, int8 per channel, 1 thread, interleaved runs: 4.16 -> 3.91 ms
    per token with an int8 head, 7.83 -> 7.48 ms with the fp32 head). Left alone: parameters, buffers that share their
    memory with another tensor or do not own all of it, other tensor types, and everything when huge pages are not
    usable. Each buffer is replaced by a view of the new one with the same values; the originals are freed."""
    import torch

    if not huge_pages_usable():
        return 0
    users: dict[int, int] = {}
    for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu":  # not DTensor & co
            ptr = t.untyped_storage().data_ptr()
            users[ptr] = users.get(ptr, 0) + 1
    todo, seen = [], set()
    for module in model.modules():
        for name, t in module._buffers.items():
            if (t is None or type(t) is not torch.Tensor or t.device.type != "cpu" or t.requires_grad
                    or not min_bytes <= t.nbytes < _HUGE or not t.is_contiguous() or t.storage_offset()):
                continue
            storage = t.untyped_storage()
            if storage.nbytes() != t.nbytes or users.get(storage.data_ptr()) != 1 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            todo.append((module, name, t))
    if len(todo) < 2:
        return 0
    sizes = [(t.nbytes + 63) // 64 * 64 for _, _, t in todo]
    # from the arena's first 2 MiB boundary to a whole number of huge pages: every weight lies in one
    total = (sum(sizes) + _HUGE - 1) // _HUGE * _HUGE
    arena = torch.empty(total + _HUGE, dtype=torch.uint8)
    start = -arena.data_ptr() % _HUGE
    arena, offset = arena[start:start + total], 0
    back_with_huge_pages([arena])  # before the pages are first written
    with torch.no_grad():
        for (module, name, t), size in zip(todo, sizes):
            new = arena[offset:offset + t.nbytes].view(t.dtype).view(t.shape)
            new.copy_(t)
            module._buffers[name] = new
            offset += size
    release_freed_memory()
    return offset

