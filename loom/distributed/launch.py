"""Start N local ranks of a Python command with torchrun's environment, for tests, benchmarks and notebooks.

torchrun remains the way to launch real jobs; this is the small in-process equivalent for one machine, with a hard
deadline (every rank still running at `timeout` is killed with its process group) and each rank's output captured.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, threads: int = 1) -> dict[str, str]:
    """The variables torchrun sets for `rank` of `world_size` local processes (plus OMP_NUM_THREADS)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads)}


def launch_local(world_size: int, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 600.0,
                 log_dir: str | Path | None = None, name: str = "run", cwd: str | Path | None = None
                 ) -> list[subprocess.CompletedProcess]:
    """Run `python *argv` as `world_size` ranks on this machine; returns each rank's (returncode, output).

    `env` is added to the current environment of every rank. A single rank (world_size 1) gets no torchrun
    variables, so the program runs as a plain process. Ranks still running after `timeout` seconds are killed
    (returncode -9). Output goes to `log_dir/<name>.rank<r>.log` when `log_dir` is given, else to temporary files.
    """
    if world_size < 1:
        raise ValueError(f"launch_local: world_size must be >= 1, got {world_size}")
    port = free_port()
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory()
        log_dir = tmp.name
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    try:
        for rank in range(world_size):
            rank_vars = rank_env(rank, world_size, port) if world_size > 1 else {"OMP_NUM_THREADS": "1"}
            log = open(log_dir / f"{name}.rank{rank}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, *map(str, argv)],
                                          env={**os.environ, **rank_vars, **(env or {})}, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True))
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        results = []
        for p, log in zip(procs, logs):
            log.seek(0)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, log.read()))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()
        if tmp is not None:
            tmp.cleanup()


def check_ranks(results: list[subprocess.CompletedProcess], what: str) -> None:
    """Raise RuntimeError naming every rank that failed or was killed, with the tail of its output."""
    failed = [r for r, res in enumerate(results) if res.returncode != 0]
    if failed:
        detail = "\n".join(f"--- rank {r} (rc {results[r].returncode}) ---\n{results[r].stdout[-3000:]}" for r in failed)
        raise RuntimeError(f"{what}: ranks {failed} failed (rc -9: killed at the deadline)\n{detail}")
