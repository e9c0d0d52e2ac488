"""Regenerate every committed plot in docs/plots/ (one command), or check that every script runs (--tiny).

    python docs/heuristics/make_all.py            # full settings: about 20-30 minutes on a shared 2-core CPU
    python docs/heuristics/make_all.py --tiny     # seconds each, into a temporary folder
    python docs/heuristics/make_all.py quantization device_map   # only these

Each script runs in its own process, one after the other (they time things; running them side by side would skew
each other's numbers).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["gradient_checkpointing", "grad_accumulation", "lr_schedules", "quantization", "device_map",
           "tokenizer_throughput", "parallelism"]


def main(argv: list[str]) -> int:
    flags = [a for a in argv if a.startswith("--")]
    names = [a for a in argv if not a.startswith("--")] or SCRIPTS
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        print(f"make_all: unknown heuristic(s) {unknown}; known: {', '.join(SCRIPTS)}", file=sys.stderr)
        return 2
    for name in names:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *flags])
        if rc:
            print(f"make_all: {name} failed (exit {rc})", file=sys.stderr)
            return rc
        print(f"== {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
