"""Run a script as a two-process ``torchrun`` job on this machine (gloo on CPU), for tests."""

import os
import subprocess
import sys


def torchrun(script, *args) -> None:
    """``torchrun --standalone --nproc_per_node=2 script *args``; fails with its stderr's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        str(script),
        *map(str, args),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-4000:]
