"""`raypipe.bench` with every pause of Python's garbage collector over a threshold printed.

    python benchmarks/bench_gc_pauses.py --steps 30 --warmup 3          # the arguments of python -m raypipe.bench
    RAYPIPE_GC_PAUSE_MS=1 python benchmarks/bench_gc_pauses.py ...        # threshold, ms (default 5)

Each collection over the threshold prints `[gc] generation 2: 287.1 ms, 6,500 collected`, in order with the
run's own lines, so a collection that falls between counted steps shows beside the progress line it slowed.
Bare runs only: under `--ray` the collections of Ray's worker processes are not seen from here.
"""

import gc
import os
import sys
import time

THRESHOLD_S = float(os.environ.get("RAYPIPE_GC_PAUSE_MS", "5")) / 1000
_started = [0.0]


def report_pause(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    took = time.perf_counter() - _started[0]
    if took > THRESHOLD_S:
        print(f"[gc] generation {info['generation']}: {took * 1000:.1f} ms, {info['collected']:,} collected", flush=True)


if __name__ == "__main__":
    gc.callbacks.append(report_pause)
    from raypipe.bench import main

    sys.exit(main(sys.argv[1:]))
