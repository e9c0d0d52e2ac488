"""CUDA smoke check, run on a GPU machine: load + generate in bf16, a bitsandbytes 4-bit layer, a 1-process NCCL
group, built-in weight-only int8 on CUDA. Prints one line per check; exits non-zero if any failed."""
from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import loom  # noqa: E402

results = []


def check(name):
    def wrap(fn):
        try:
            detail = fn()
            results.append((name, True, detail))
        except Exception as e:  # report and carry on with the other checks
            results.append((name, False, f"{type(e).__name__}: {e}"))
            traceback.print_exc()
        return fn
    return wrap


tmp = tempfile.mkdtemp()
torch.manual_seed(0)
cfg = loom.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
loom.LlamaForCausalLM(cfg).save_pretrained(tmp)
prompt = torch.randint(3, 512, (2, 12))


@check("load bf16 on cuda + generate")
def _():
    m = loom.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, device_map="cuda")
    assert m.device.type == "cuda" and m.dtype == torch.bfloat16
    out = m.generate(prompt.cuda(), max_new_tokens=16, do_sample=False)
    ref = loom.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    out32 = ref.generate(prompt, max_new_tokens=16, do_sample=False)
    same = (out.cpu() == out32).float().mean().item()
    return f"shape {tuple(out.shape)}, token agreement with CPU fp32 {same:.2f}"


@check("bitsandbytes 4-bit (nf4) load + forward")
def _():
    q = loom.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    m = loom.AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, device_map="cuda")
    full = loom.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, device_map="cuda")
    with torch.no_grad():
        a, b = m(prompt.cuda()).logits.float(), full(prompt.cuda()).logits.float()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    kinds = sorted({type(mod).__name__ for mod in m.modules() if "4bit" in type(mod).__name__.lower()})
    assert kinds, "no 4-bit layers were created"
    return f"layers {kinds}, logits cosine vs bf16 {cos:.4f}"


@check("built-in int8 weight-only on cuda")
def _():
    m = loom.AutoModelForCausalLM.from_pretrained(tmp, quantization_config=loom.WeightOnlyConfig(bits=8),
                                                  device_map="cuda")
    out = m.generate(prompt.cuda(), max_new_tokens=8, do_sample=False)
    return f"generated {tuple(out.shape)}"


@check("NCCL 1-process group")
def _():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    t = torch.ones(4, device="cuda")
    dist.all_reduce(t)
    dist.destroy_process_group()
    return f"all_reduce -> {t.tolist()}"


print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
for name, ok, detail in results:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
sys.exit(0 if all(ok for _, ok, _ in results) else 1)
