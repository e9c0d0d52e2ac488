"""Shared by the heuristic scripts: arguments (--tiny / --out), isolated worker processes, memory readings, plots.

Every script runs in two modes: `--tiny` (seconds; what tests/test_docs.py runs, writing into a temporary folder)
and full (a few minutes on a 2-core CPU; writes the committed docs/plots/<name>.png plus <name>.json with the raw
numbers the guides quote).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# measurements use local files only; a hub lookup that waits for a network timeout would be timed too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PLOTS = ROOT / "docs" / "plots"
if str(ROOT) not in sys.path:  # the scripts run as plain files, with or without loom installed
    sys.path.insert(0, str(ROOT))


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="seconds-long settings (for tests); plots are not "
                        "representative")
    parser.add_argument("--out", type=Path, default=None, help=f"folder for the PNG and JSON (default {PLOTS}, or "
                        "a temporary folder with --tiny)")
    args = parser.parse_args(argv)
    if args.out is None:
        if args.tiny:
            import tempfile

            args.out = Path(tempfile.mkdtemp(prefix="loom-heuristic-"))
        else:
            args.out = PLOTS
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, name: str, out: Path, data: dict[str, Any]) -> Path:
    """Write <out>/<name>.png and <out>/<name>.json; print where they went."""
    png = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    print(f"wrote {png}")
    return png


def one_thread() -> None:
    """Run torch on one thread: on a shared 2-core machine, OpenMP threads that wait for each other make a tiny step
    50x slower (1.6 s vs 25 ms measured), which would drown every effect being measured."""
    import torch

    torch.set_num_threads(1)


def environment_note() -> str:
    """What the plots' subtitles say about the machine (each script states its own thread settings)."""
    import platform

    import torch

    return f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs"


# -- isolated measurements ------------------------------------------------------------------------------------------
def run_worker(script: str, payload: dict, env: dict[str, str] | None = None, timeout: float = 600,
               inline=None) -> dict:
    """Run `python script --worker JSON` in a fresh process (so its peak memory is its own) and return its JSON.

    With `inline` (a function; the --tiny runs pass the worker) it runs in this process instead: faster, but the
    memory readings are then not separate.
    """
    if inline is not None:
        return inline(payload)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(payload)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} worker failed for {payload}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_payload() -> dict | None:
    """The payload when this process was started by run_worker, else None."""
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return json.loads(sys.argv[2])
    return None


def run_script(main, worker) -> None:
    """A script's entry point: started by run_worker, print worker(payload) as JSON for the parent; else main()."""
    payload = worker_payload()
    if payload is not None:
        print(json.dumps(worker(payload)))
    else:
        main()


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Highest resident memory of this process's own address space, in MiB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec, so a worker
    started by a big parent would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: best effort


def rss_parts_mib() -> dict[str, float]:
    """This process's resident memory now, split into anonymous (heap: only freed by the process) and file-backed
    (memory-mapped files: the kernel can drop and re-read those pages under pressure), in MiB."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                parts[line.split(":")[0]] = int(line.split()[1]) / 1024
    return parts


def tiny_llama_config(**overrides):
    from loom.models.llama import LlamaConfig

    base = dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024)
    return LlamaConfig(**{**base, **overrides})
