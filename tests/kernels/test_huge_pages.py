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


class _Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.randint(-127, 127, (512, 256), dtype=torch.int8))  # 128 KiB
        self.register_buffer("b", torch.randint(0, 255, (1024, 512), dtype=torch.uint8))  # 512 KiB
        self.register_buffer("tiny", torch.randn(16))  # below min_bytes
        self.register_buffer("big", torch.randint(0, 255, (4 << 20,), dtype=torch.uint8))  # a huge page or more
        self.p = torch.nn.Parameter(torch.randn(512, 256))  # parameters stay
        whole = torch.randn(256, 512)
        self.register_buffer("part", whole[:128])  # does not own its storage
        shared = torch.randn(256, 256)
        self.left, self.right = torch.nn.Module(), torch.nn.Module()
        self.left.register_buffer("s", shared)  # one tensor under two names
        self.right.register_buffer("s", shared)


def test_gather_small_buffers_moves_only_small_owned_buffers():
    m = _Holder()
    before = {k: (v.clone(), v.data_ptr()) for k, v in [*m.named_parameters(), *m.named_buffers(remove_duplicate=False)]}
    moved = memory.gather_small_buffers(m)
    after = dict([*m.named_parameters(), *m.named_buffers(remove_duplicate=False)])
    for k, (value, ptr) in before.items():
        assert torch.equal(after[k], value), k
        assert after[k].dtype == value.dtype and after[k].shape == value.shape
    if not memory.huge_pages_usable():
        assert moved == 0
        return
    assert moved == (512 * 256 + 1024 * 512)  # both sizes are multiples of 64 bytes
    assert m.a.untyped_storage().data_ptr() == m.b.untyped_storage().data_ptr()
    assert m.a.data_ptr() % (2 << 20) == 0  # the first lies on a huge page boundary
    for k in ("tiny", "big", "p", "part", "left.s", "right.s"):
        assert after[k].data_ptr() == before[k][1], k
    assert m.left.s is m.right.s
    m.a.add_(1)  # still a buffer of its own: writing one leaves the other's values
    assert torch.equal(m.b, before["b"][0])
    release = tuple(int(x) for x in __import__("platform").release().split(".")[:2] if x.isdigit())
    if release >= (6, 1):
        huge = _anon_huge_kb(m.a.data_ptr())
        assert huge is not None and huge >= 2048, f"AnonHugePages {huge} kB"


def test_gather_small_buffers_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("LOOM_HUGE_PAGES", "off")
    m = _Holder()
    ptr = m.a.data_ptr()
    assert memory.gather_small_buffers(m) == 0
    assert m.a.data_ptr() == ptr


def test_quantized_load_gathers_weights_and_round_trips(tmp_path, monkeypatch):
    import loom
    from loom.quantization.linear import Int8Linear

    torch.manual_seed(0)
    config = loom.LlamaConfig(vocab_size=99, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=512, max_position_embeddings=64)
    loom.LlamaForCausalLM(config).save_pretrained(tmp_path / "fp32")
    q = loom.LlamaForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=loom.WeightOnlyConfig(bits=8))
    layers = [m for m in q.modules() if type(m) is Int8Linear]
    assert len(layers) == 14
    big = [m for m in layers if m.weight.nbytes >= 64 << 10]  # q, o, gate, up, down; k and v are 32 KiB
    assert len(big) == 10
    storages = {m.weight.untyped_storage().data_ptr() for m in big}
    for m in layers:  # where fbgemm runs (kernels off), its packed copy was made from the gathered weight
        assert m.kernel != "fbgemm_int8" or m._packed_stamp[0] is m.weight
    monkeypatch.setenv("LOOM_HUGE_PAGES", "off")
    apart = loom.LlamaForCausalLM.from_pretrained(tmp_path / "fp32",
                                                  quantization_config=loom.WeightOnlyConfig(bits=8))
    assert len({m.weight.untyped_storage().data_ptr() for m in apart.modules() if type(m) is Int8Linear}) == 14
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        logits = q(ids).logits
        assert torch.equal(logits, apart(ids).logits)
        assert torch.equal(q.generate(ids, max_new_tokens=6, do_sample=False),
                           apart.generate(ids, max_new_tokens=6, do_sample=False))
    q.save_pretrained(tmp_path / "int8")
    back = loom.LlamaForCausalLM.from_pretrained(tmp_path / "int8")
    for (name, a), b in zip(q.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    monkeypatch.delenv("LOOM_HUGE_PAGES")
    if memory.huge_pages_usable():
        assert len(storages) == 1


def test_quantize_in_memory_gathers_weights(monkeypatch):
    import copy

    import loom
    from loom.quantization.linear import Int8Linear

    torch.manual_seed(0)
    config = loom.LlamaConfig(vocab_size=99, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=4, intermediate_size=512, max_position_embeddings=64)
    model = loom.LlamaForCausalLM(config).eval()
    apart = copy.deepcopy(model)
    loom.quantize_(model, loom.WeightOnlyConfig(bits=8))
    monkeypatch.setenv("LOOM_HUGE_PAGES", "off")
    loom.quantize_(apart, loom.WeightOnlyConfig(bits=8))
    monkeypatch.delenv("LOOM_HUGE_PAGES")
    layers = [m for m in model.modules() if type(m) is Int8Linear]
    assert len(layers) == 7
    if memory.huge_pages_usable():
        assert len({m.weight.untyped_storage().data_ptr() for m in layers}) == 1
    assert len({m.weight.untyped_storage().data_ptr() for m in apart.modules() if type(m) is Int8Linear}) == 7
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, apart(ids).logits)
    for (name, a), b in zip(model.state_dict().items(), apart.state_dict().values()):
        assert torch.equal(a, b), name
