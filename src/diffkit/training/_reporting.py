"""Reporting, on rank 0: a progress display, ``log.jsonl`` (and TensorBoard), sample grids.

The progress display is a live tqdm bar on a terminal or in a notebook and a plain line
every 30 s anywhere else (a log file, CI, a pipe); tqdm is imported only when a display
is made. The log keeps one record per logged step across interruptions: a resumed run
first cuts what the interrupted run logged after the checkpoint it resumes from.
"""

import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffkit.ema import EMA

__all__ = ["RunLog", "progress_bar", "save_samples"]

SampleFn = Callable[[nn.Module, torch.Generator], Tensor]
"""``sample(model, generator) -> samples in [-1, 1]``: what a sample grid shows."""

_PROGRESS_LINE_EVERY_S = 30.0
"""Seconds between the plain progress lines written where no live bar can be drawn."""


class _ProgressLines:
    """Progress for a log (not a terminal): a plain line every ``interval`` seconds.

    Speaks the part of tqdm's interface that diffkit uses (``update``, ``set_postfix``,
    ``close``, ``with``). A last line is written on close when earlier lines were.
    """

    def __init__(self, total: int, desc: str, initial: int, file: Any, interval: float) -> None:
        self.total, self.desc, self.n = total, desc, initial
        self.file, self.interval = file, interval
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.written = -1  # the step count of the last line written

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def close(self) -> None:
        if self.written >= 0 and self.written != self.n:
            self._write(time.monotonic())

    def _write(self, now: float) -> None:
        extra = f", {self.postfix}" if self.postfix else ""
        self.file.write(
            f"{self.desc}: {self.n}/{self.total} steps ({now - self.started:.0f} s{extra})\n"
        )
        self.file.flush()
        self.written = self.n

    def __enter__(self) -> "_ProgressLines":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except ImportError:
        return False


def progress_bar(
    total: int,
    desc: str,
    *,
    enabled: bool = True,
    initial: int = 0,
    file: Any = None,
    **tqdm_options: Any,
) -> Any:
    """A progress display as ``TrainConfig.progress`` describes it (``file``: stderr).

    A notebook or a terminal gets a live tqdm bar when tqdm is installed (the ``progress``
    extra); without tqdm, and on any other stream (a log file, a CI log, a pipe), a
    ``_ProgressLines`` report, so that no carriage-return redraws pile up in it.
    ``enabled=False``: a display that shows nothing. tqdm is imported only for a live bar
    (or, under a Jupyter kernel, to ask whether it runs in a notebook).
    """
    if not enabled:
        return _ProgressLines(total, desc, initial, None, math.inf)
    options: dict[str, Any] = {"total": total, "desc": desc, "initial": initial, "unit": "step"}
    has_tqdm = _installed("tqdm")  # an optional dependency (the ``progress`` extra)
    if has_tqdm and file is None and "ipykernel" in sys.modules:
        from tqdm import tqdm as terminal_tqdm
        from tqdm.auto import tqdm as auto_tqdm  # (imports tqdm.autonotebook, warnings off)
        from tqdm.autonotebook import tqdm as chosen_tqdm

        if chosen_tqdm is not terminal_tqdm:  # a notebook: its widget
            return auto_tqdm(**options, **tqdm_options)
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    if has_tqdm and callable(isatty) and isatty():
        from tqdm import tqdm as terminal_tqdm

        return terminal_tqdm(file=stream, **options, **tqdm_options)
    return _ProgressLines(total, desc, initial, stream, _PROGRESS_LINE_EVERY_S)


class RunLog:
    """Rank-0 logging to ``log.jsonl`` and, when installed, TensorBoard.

    A run that starts at step ``start`` (a resume, or 0) first drops what an earlier,
    interrupted run logged after that step, so that each step is logged once: the
    records of ``log.jsonl`` past ``start`` are cut (the file is rewritten atomically)
    and TensorBoard purges its events past ``start`` (``purge_step``).
    """

    def __init__(self, folder: Path | None, tensorboard: bool, start: int = 0) -> None:
        self.file = None
        self.writer: Any = None
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        _cut_log(folder / "log.jsonl", start)
        self.file = open(folder / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                return
            # records are logged at step start + 1 onwards: TensorBoard drops events >= it
            self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"), purge_step=start + 1)

    def log(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _cut_log(path: Path, start: int) -> None:
    """Keep only the records of ``path`` (a ``log.jsonl``) up to step ``start``, atomically.

    The rest were logged by an interrupted run after the checkpoint this run resumes
    from (or, at ``start`` 0, by a run that left no checkpoint); this run logs those
    steps again. A line that is not a record (one cut short by a crash) is dropped too.
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (step := _record_step(line)) is not None and step <= start]
    if len(kept) == len(lines) and (not lines or lines[-1].endswith("\n")):
        return
    fd, temp = tempfile.mkstemp(prefix=".log.jsonl.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, path.stat().st_mode & 0o777)  # mkstemp's file is private (0600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _record_step(line: str) -> int | None:
    """The ``step`` of one ``log.jsonl`` line; None when it is not a record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def save_samples(
    sample: SampleFn, ema: EMA | None, denoiser: nn.Module, seed: int, step: int, out: Path
) -> Path:
    """Save a grid of ``sample(model, generator)`` (the EMA weights when there are any).

    Written to ``out/samples/step-<step>.png``; the model is in eval mode meanwhile.
    """
    from diffkit.data import save_grid  # pillow: only when a grid is written

    model = ema.averaged() if ema is not None else denoiser
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            images = sample(model, torch.Generator().manual_seed(seed))
    finally:
        model.train(was_training)
    # clamped: an early model's samples can overshoot [-1, 1] far more than save_grid accepts
    return save_grid(images.float().cpu().clamp(-1, 1), out / "samples" / f"step-{step:08d}.png")
