"""Measurements on the machine at hand: load-aware timing, and the decisions measured with it, kept per machine.

Which few-row product streams a weight fastest (`linear_rwkv7`) and which WKV chunk size and chunked-vs-loop length
are fastest (`wkv`) depend on the CPU, its memory, the thread count and torch. Each decision is measured once per
machine and stored in a JSON file under the package's cache folder (`decisions_path()`: $RWKV7_CACHE, else
~/.cache/modeling_rwkv7; delete it to measure again), keyed by the CPU model, its ISA flags, the thread count and
the torch version, so that a fresh process reads the decisions instead of timing candidates again.
"""

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_loaded: dict[Path, dict] = {}


def cache_root() -> Path:
    """The package's cache folder: $RWKV7_CACHE, else $XDG_CACHE_HOME/modeling_rwkv7 (~/.cache/modeling_rwkv7)."""
    if os.environ.get("RWKV7_CACHE"):
        return Path(os.environ["RWKV7_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modeling_rwkv7"


def machine() -> dict:
    """What a measured decision holds for: CPU model, ISA flags, thread count, torch version."""
    model, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() == "model name" and not model:
                    model = value.strip()
                elif name.strip() in ("flags", "Features") and not flags:
                    flags = value.strip()
    except OSError:
        pass
    return {"cpu": model, "flags": flags, "threads": torch.get_num_threads(), "torch": torch.__version__}


def decisions_path() -> Path:
    """The JSON file of this machine's decisions (see `machine`)."""
    digest = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "decisions" / f"{digest}.json"


def stored_decision(kind: str, key: tuple) -> Optional[dict]:
    """The decision of `kind` ("few_row", "wkv") stored for `key` on this machine, or None."""
    path = decisions_path()
    if path not in _loaded:
        try:
            _loaded[path] = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: measured again and rewritten
            _loaded[path] = {}
    return _loaded[path].get(kind, {}).get(_key_text(key))


def store_decision(kind: str, key: tuple, decision: dict) -> None:
    """Keep `decision` (JSON values) for `key`; written atomically (a lost race only costs a measurement later).
    Where the cache folder cannot be written, the decision holds for this process only."""
    path = decisions_path()
    stored_decision(kind, key)  # loads the file
    decisions = _loaded[path]
    decisions.setdefault("machine", machine())
    decisions.setdefault(kind, {})[_key_text(key)] = decision
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".partial", delete=False) as staging:
            json.dump(decisions, staging, indent=1, sort_keys=True)
        os.replace(staging.name, path)
    except OSError:
        pass


def _key_text(key: tuple) -> str:
    return "|".join(str(part) for part in key)


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes have used (from /proc/stat), or nan where there is no /proc."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS  # all but idle and iowait


def timed_call(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(`fn()`, its wall seconds, the CPU seconds other processes used meanwhile: nan where there is no /proc).
    The load-aware timer of the decisions below and of `scripts/bench.py`."""
    busy_before, own_before, start = _busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
    result = fn()
    wall = time.perf_counter() - start
    other_cpu = max((_busy_cpu_seconds() - busy_before) - (sum(os.times()[:2]) - own_before), 0.0)
    return result, wall, other_cpu


def median_seconds(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds (all threads) of `fn()` over `reps` runs after one warm-up: the
    timer of the micro-benchmarks (`scripts/bench_wkv_op.py`, `scripts/bench_tokenizer.py`)."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu)


def timed_while_quiet(time_once: Callable[[], dict]) -> tuple[dict, float]:
    """`time_once()` (it returns seconds per candidate) and the CPU seconds other processes used meanwhile, taken
    once more if they kept a core busy half the time (on a 2-core machine such load slows threaded work tens of
    times): the quieter of the at most two attempts (nothing waits for a quiet machine)."""
    quietest = None
    for _attempt in range(2):
        seconds, wall, other_cpu = timed_call(time_once)
        if quietest is None or other_cpu < quietest[1]:
            quietest = seconds, other_cpu
        if not other_cpu > 0.5 * wall:  # idle enough (or no /proc: nan)
            break
    return quietest


__all__ = [
    "cache_root",
    "decisions_path",
    "machine",
    "median_seconds",
    "store_decision",
    "stored_decision",
    "timed_call",
    "timed_while_quiet",
]
