"""Wall time, faces/s and peak memory of the whole shard build (main process plus its workers).

    python benchmarks/bench_build.py --synthetic 20000 --workers 2
    python benchmarks/bench_build.py --synthetic 300000 --workers 2 --out /tmp/big   # kept afterwards
    python benchmarks/bench_build.py --workers 2 -- --dataset fgnet --root data/FGNET/images

Runs the builder (`agecl.build.main`, from whatever `agecl` this Python imports: PYTHONPATH decides,
so the same script measures another checkout; the JSON's `agecl` says which) as a child process and samples, every
`--interval` seconds, the resident memory of that process and all its descendants from /proc:
`ru_maxrss` would miss the spawned workers. Prints one JSON line:

    n               inputs of the build (the manifest's count)
    wall_s          the build's wall time, start to exit
    faces_per_s     n / wall_s
    peak_rss_mb     peak of the sum of RSS over the process tree (what `top` and psutil add up;
                    it counts the libraries the workers share once per process)
    peak_pss_mb     peak of the sum of PSS (shared pages split between the processes that map them)
    peak_main_rss_mb  the builder's own process alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit, cpu_name  # noqa: E402

_RUN_BUILDER = "import sys; from agecl.build import main; sys.exit(main(sys.argv[1:]))"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process /proc shows."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])  # fields after "(comm)": state ppid ...
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _tree(root: int) -> list[int]:
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += tree.get(pid, [])
    return out


def _rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * _PAGE
        pss = rss
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


class TreeMemory(threading.Thread):
    """Samples the process tree under `pid` until stopped; keeps the peaks."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = self.peak_main = self.peak_processes = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def sample(self) -> None:
        pids = _tree(self.pid)
        sizes = [_rss_pss(p) for p in pids]
        self.peak_rss = max(self.peak_rss, sum(r for r, _ in sizes))
        self.peak_pss = max(self.peak_pss, sum(p for _, p in sizes))
        self.peak_main = max(self.peak_main, sizes[0][0] if sizes else 0)
        self.peak_processes = max(self.peak_processes, sum(1 for r, _ in sizes if r))
        self.samples += 1

    def stop(self) -> None:
        self._done.set()
        self.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="build the generated dataset of N faces")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="shard folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between memory samples")
    p.add_argument("builder_args", nargs="*", help="after --: more make_shards arguments (e.g. a real dataset)")
    o = p.parse_args()
    if not o.synthetic and not o.builder_args:
        p.error("give --synthetic N or, after --, the arguments of a real dataset")
    scratch = None if o.out else tempfile.mkdtemp(prefix="bench_build-")
    out = Path(o.out or Path(scratch) / "shards").resolve()
    args = [*(["--synthetic", str(o.synthetic)] if o.synthetic else []), "--workers", str(o.workers),
            "--out", str(out), "--quiet", *o.builder_args]
    try:
        t0 = time.perf_counter()
        # Run in the output's folder: `python -c` puts the working directory first on sys.path, and
        # a checkout there would shadow the agecl that PYTHONPATH names.
        proc = subprocess.Popen([sys.executable, "-c", _RUN_BUILDER, *args], stdout=subprocess.DEVNULL, cwd=out.parent)
        mem = TreeMemory(proc.pid, o.interval)
        mem.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        mem.stop()
        if rc != 0:
            sys.exit(f"bench_build: the builder exited with {rc}")
        manifest = json.loads((out / "manifest.json").read_text())
        builder = subprocess.run([sys.executable, "-c", "import agecl; print(agecl.__file__)"], cwd=out.parent,
                                 capture_output=True, text=True).stdout.strip()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    n = int(manifest["inputs"])
    print(json.dumps({
        "bench": "build",
        "dataset": manifest["dataset"],
        "n": n,
        "samples": manifest["samples"],
        "workers": o.workers,
        "chunk_size": manifest.get("chunk_size"),
        "shard_size": manifest.get("shard_size"),
        "wall_s": round(wall, 1),
        "faces_per_s": round(n / wall, 1),
        "peak_rss_mb": round(mem.peak_rss / 2**20, 1),
        "peak_pss_mb": round(mem.peak_pss / 2**20, 1),
        "peak_main_rss_mb": round(mem.peak_main / 2**20, 1),
        "peak_processes": mem.peak_processes,
        "memory_samples": mem.samples,
        "agecl": str(Path(builder).resolve().parent),  # the builder's code, as its process imports it
        "commit": commit(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
    }))


if __name__ == "__main__":
    main()
