"""Cost of validating configs: a small one, the training config, a whole pipeline.

Prints the median CPU time (``time.process_time``) in µs per validation of valid input,
the path every build takes (a misspelled field only costs on the error path)::

    python benchmarks/config_validation.py
    PYTHONPATH=/tmp/before/src python benchmarks/config_validation.py  # another checkout
"""

import argparse
import statistics
import time
from collections.abc import Callable


def _cases() -> dict[str, tuple[Callable[[], object], int]]:
    """The validations to time and how many calls make one round."""
    import torch

    from diffkit.builder import PipelineConfig
    from diffkit.schedules import Cosine
    from diffkit.training import TrainConfig
    from diffkit_demo.recipes import default_config

    torch.set_num_threads(1)
    pipeline = default_config("image").pipeline.to_dict()
    return {
        "Cosine(offset=0.01)": (lambda: Cosine(offset=0.01), 2000),
        "TrainConfig(steps=10, lr=1e-3)": (lambda: TrainConfig(steps=10, lr=1e-3), 2000),
        "PipelineConfig.model_validate(demo image pipeline dict)": (
            lambda: PipelineConfig.model_validate(pipeline),
            200,
        ),
    }


def main() -> None:
    """Time each case and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="rounds per case")
    args = parser.parse_args()
    print("median of", args.repeats, "rounds, CPU µs per validation\n")
    print("| validation | µs |\n| --- | ---: |")
    for name, (call, calls) in _cases().items():
        call()
        rounds = []
        for _ in range(args.repeats):
            start = time.process_time()
            for _ in range(calls):
                call()
            rounds.append((time.process_time() - start) / calls * 1e6)
        print(f"| `{name}` | {statistics.median(rounds):.2f} |")


if __name__ == "__main__":
    main()
