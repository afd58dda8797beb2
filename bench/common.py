"""Shared helpers for the benchmarks in bench/: peak memory, medians, running one side of
a comparison in its own process, and the one-JSON-object last line every benchmark prints.
(The matmul peak that MFU is taken against is `echolm.machine.matmul_peak_tflops`.)

The benchmarks are run as scripts (``python bench/NAME.py``), so they import this module
as ``common`` (the script's folder is first on sys.path).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def require_peer(*modules: str) -> None:
    """Exit with one line saying how to install the peer when it is missing (the `bench`
    extra), instead of a traceback ending in "No module named 'trl'"."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{Path(sys.argv[0]).name} compares Echo with {', '.join(missing)}, which is "
                 "not installed: run `make bench` (all benchmarks), or install the bench extra "
                 "with `.venv/bin/pip install -e '.[bench]'`")


def peer_kernel_caches() -> None:
    """Give the peer's process oneDNN's and ideep's own kernel-cache sizes (1,024 each), as
    its users run it: importing echolm (this bench's helpers do, in every child) bounds them
    to 64 (echolm/__init__.py). Call before the peer's first matrix product (they are read
    then)."""
    from echolm import KERNEL_CACHES

    os.environ.update(dict.fromkeys(KERNEL_CACHES, "1024"))


def kernel_cache() -> str | None:
    """The oneDNN kernel-cache size this process runs with, for a side's JSON."""
    return os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024


def current_rss_mb() -> float:
    """Resident set size right now, in MiB (0 where /proc is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def parse_dtype(name: str) -> torch.dtype:
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise SystemExit(f"dtype '{name}': expected fp32 or bf16") from None


def run_json_child(argv: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run a Python child (`argv` after the interpreter) and parse the JSON object on the
    last line of its stdout; its stderr passes through. Raises with the child's output on
    failure so a broken side is never silently reported as a number."""
    proc = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, text=True,
                          timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {argv} failed (exit {proc.returncode}):\n{proc.stdout}")
    return json.loads(lines[-1])


class LockstepChild:
    """One side of a comparison in its own process, driven one command at a time.

    The child prints one JSON object per line on stdout: one when it is ready, then one reply
    per command line it reads on stdin; ``close`` sends "done" and returns its last object.
    Two of these stepped in alternation see the same machine load (paired samples) while
    each keeps its own peak RSS; an idle child blocks on stdin and uses no CPU.
    """

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        skipped = []
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
            skipped.append(line)  # stray prints from libraries: not part of the protocol
        self.proc.wait()
        raise RuntimeError(f"child {self.argv} ended (exit {self.proc.returncode}) "
                           f"without a reply; its other output: {skipped}")

    def request(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict[str, Any]:
        last = self.request("done")
        self.proc.wait(timeout=60)
        return last

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def serve_lockstep(handlers: dict[str, Any], ready: dict[str, Any]) -> None:
    """The child side of LockstepChild: print `ready`, then answer each stdin line with
    ``handlers[line]()`` (a dict) until "done", answered by ``handlers["done"]()``."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command not in handlers:
            raise SystemExit(f"unknown command {command!r} (known: {sorted(handlers)})")
        print(json.dumps(handlers[command]()), flush=True)
        if command == "done":
            return


def emit_json(record: dict[str, Any]) -> None:
    """Print `record` as the single-line JSON object that ends a benchmark's stdout."""
    sys.stdout.flush()
    print(json.dumps(record), flush=True)


def llama_config(cfg: Any, **extra: Any) -> Any:
    """transformers' LlamaConfig computing exactly what Echo's model `cfg` (a ModelConfig:
    untied, no biases, no QK-norm) computes; `extra` adds or overrides fields."""
    from transformers import LlamaConfig

    return LlamaConfig(**{
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.d_mlp, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.d_head, "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, **extra})


def alternating_rounds(keys: list[str], rounds: int, argv_of: Callable[[str], list[str]],
                       note: Callable[[dict[str, Any]], str] = lambda _r: ""
                       ) -> dict[str, list[dict[str, Any]]]:
    """Run each side (`argv_of(key)`: a child printing a JSON object with ``step_s`` and
    ``peak_rss_mb``) once per round, the order reversed every other round; one line each."""
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            res = run_json_child(argv_of(key))
            results[key].append(res)
            print(f"round {r + 1}/{rounds} {key:12s}: {res['step_s']:.4f} s/step  peak RSS "
                  f"{res['peak_rss_mb']:.0f} MiB{note(res)}", flush=True)
    return results


def pair_figures(ours: list[dict[str, Any]], peer: list[dict[str, Any]]) -> dict[str, Any]:
    """Median step time over rounds and the highest peak RSS of each side, and their ratios."""
    o, p = median([r["step_s"] for r in ours]), median([r["step_s"] for r in peer])
    rss_o, rss_p = max(r["peak_rss_mb"] for r in ours), max(r["peak_rss_mb"] for r in peer)
    return {"ours": round(o, 4), "peer": round(p, 4), "ratio": round(o / p, 3),
            "peak_rss_mb_ours": round(rss_o, 1), "peak_rss_mb_peer": round(rss_p, 1),
            "rss_ratio": round(rss_o / rss_p, 3),
            "rounds_ours": [round(r["step_s"], 4) for r in ours],
            "rounds_peer": [round(r["step_s"], 4) for r in peer]}


def print_modes(modes: dict[str, dict[str, Any]]) -> None:
    """One line per mode (full, lora ...): step seconds and peak RSS, ours vs the peer."""
    print(f"{'mode':8s} {'echo s/step':>11s} {'peer s/step':>11s} {'ratio':>6s}  "
          f"{'echo RSS':>9s} {'peer RSS':>9s} {'ratio':>6s}")
    for mode, f in modes.items():
        print(f"{mode:8s} {f['ours']:11.4f} {f['peer']:11.4f} {f['ratio']:6.3f}  "
              f"{f['peak_rss_mb_ours']:6.0f} MiB {f['peak_rss_mb_peer']:5.0f} MiB "
              f"{f['rss_ratio']:6.3f}", flush=True)
