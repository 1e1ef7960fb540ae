"""Cost of the runtime shape checks (``diffkit.typing.checked``) per call.

Times checked public functions in two fresh interpreters, one with
``DIFFKIT_SHAPE_CHECKS=1`` (the default) and one with ``=0`` (read once at import, so
each setting needs its own process), and prints the medians in µs per call::

    python benchmarks/shape_check_overhead.py            # default sizes
    python benchmarks/shape_check_overhead.py --repeats 31 --calls 200
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


def _cases() -> dict[str, Callable[[], object]]:
    """The calls to time: small tensors, so the fixed per-call cost is visible."""
    import torch

    import diffkit as dk

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batch = 8
    x_t = torch.randn(batch, 4, 32, 32, generator=g)
    pred = torch.randn(batch, 4, 32, 32, generator=g)
    t = torch.rand(batch, generator=g)
    cosine = dk.schedules.Cosine()
    alpha, sigma = cosine.alpha(t), cosine.sigma(t)
    return {
        "prediction.convert(v -> epsilon), (8,4,32,32)": lambda: dk.prediction.convert(
            pred, "v", "epsilon", x_t, alpha, sigma
        ),
        "Cosine().alpha(t), t: (8,)": lambda: cosine.alpha(t),
        "Cosine().log_snr(t), t: (8,)": lambda: cosine.log_snr(t),
        "forward.add_noise(Cosine, x0, eps, t), (8,4,32,32)": lambda: dk.forward.add_noise(
            cosine, x_t, pred, t
        ),
    }


def _child(repeats: int, calls: int) -> None:
    import diffkit as dk

    results: dict[str, float] = {}
    for name, fn in _cases().items():
        for _ in range(max(10, calls // 10)):  # warm-up (first-call caches, allocator)
            fn()
        per_call = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call.append((time.perf_counter() - start) / calls * 1e6)
        results[name] = statistics.median(per_call)
    json.dump({"checks": dk.typing.CHECKS_ENABLED, "us_per_call": results}, sys.stdout)


def _run(checks: bool, repeats: int, calls: int) -> dict[str, float]:
    env = {**os.environ, "DIFFKIT_SHAPE_CHECKS": "1" if checks else "0"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", f"--repeats={repeats}", f"--calls={calls}"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data = json.loads(out)
    assert data["checks"] is checks, "DIFFKIT_SHAPE_CHECKS was not honoured"
    return data["us_per_call"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds (median taken)")
    parser.add_argument("--calls", type=int, default=100, help="calls per round")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.repeats, args.calls)
        return
    import torch

    on = _run(True, args.repeats, args.calls)
    off = _run(False, args.repeats, args.calls)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 torch thread; "
        f"median of {args.repeats} rounds x {args.calls} calls, µs per call"
    )
    print()
    print("| call | checks on (µs) | checks off (µs) | overhead (µs) | on / off |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in on:
        a, b = on[name], off[name]
        print(f"| `{name}` | {a:.1f} | {b:.1f} | {a - b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
