"""Safe, atomic checkpoints: safetensors only, never pickle.

Every file is written to a temporary name in the target folder and moved into place
with ``os.replace``, so a process killed at any moment leaves either the old file or
the new one, never half of one. Tensors go into safetensors; everything that is not a
tensor (optimizer hyper-parameters, the step, RNG states of Python's ``random``) goes
into the safetensors header as JSON. Nothing is ever unpickled, so loading a file from
an untrusted source cannot run code.

A training checkpoint (``checkpoint-00000100.safetensors``) holds, under key prefixes:

- ``model.*``: the denoiser's ``state_dict``;
- ``ema.*``: the exponential moving average of its weights;
- ``optimizer.*``: the optimizer's state tensors (``exp_avg``, ``step``, ...), with the
  nesting of ``optimizer.state_dict()`` and the optimizer's class name kept in the header;
- ``rng.*``: torch CPU (and CUDA) generator states as ``uint8`` tensors and NumPy's
  global state; Python's ``random`` state is in the header;
- ``rng.rank.*``: in a training run, every process's torch CPU (and CUDA) generator
  state, stacked by rank (``rng.rank.torch`` has shape ``(world_size, n)``).

A file that does not parse, or whose keys or shapes do not match the model, raises
[`CheckpointError`][diffkit.checkpoint.CheckpointError] listing the missing,
unexpected and mis-shaped keys. Loading checks everything (model, EMA, optimizer
class and structure) before it loads anything, so a refused checkpoint changes nothing.
"""

import contextlib
import json
import os
import random
import re
import socket
import tempfile
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "FLOAT_DTYPES",
    "CheckpointError",
    "TrainingState",
    "atomic_write",
    "check_dtypes",
    "check_loadable",
    "check_state_dict",
    "checkpoint_damage",
    "flatten_state",
    "get_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_state_dict",
    "load_tensors",
    "load_training_checkpoint",
    "newest_intact",
    "read_header",
    "remove_stale_temporaries",
    "save_tensors",
    "save_training_checkpoint",
    "set_rng_state",
    "unflatten_state",
]

FORMAT = "diffkit-training-checkpoint"
VERSION = "1"
_RANK_RNG = "rng.rank."
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not match what it is loaded into."""


# --------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        raise IsADirectoryError(f"cannot write {target}: a directory of that name is in the way")
    # The writer's host and process id are in the name: a later run removes the temporaries
    # of a process that died (kill -9) and never those of one still writing.
    prefix = f".{target.name}.{_HOST}-{os.getpid()}."
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"
_TEMPORARY_RE = re.compile(
    r"^\.(?P<name>checkpoint-\d+\.safetensors)\.(?P<host>\w+)-(?P<pid>\d+)\.[^.]+\.tmp$"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or unknowable: not ours to clean up
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary checkpoint files in ``folder`` whose writer died; return them.

    A checkpoint is written to ``.checkpoint-<step>.safetensors.<host>-<pid>.<random>.tmp``
    first; a process killed mid-write leaves that file behind at full size. Only files of
    that pattern written on this host by a process that no longer runs are removed.
    """
    root = Path(folder)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        match = _TEMPORARY_RE.match(entry.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        if entry.is_file() or entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _storable(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors that share no memory (safetensors' requirements)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"'{name}' is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().cpu()
        storage = t.untyped_storage()
        whole = storage.nbytes() == t.numel() * t.element_size() and t.is_contiguous()
        if storage.data_ptr() in seen or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (and string ``metadata``) to a safetensors file, atomically."""
    data = _storable(tensors)
    with atomic_write(path) as tmp:
        save_file(data, str(tmp), metadata=dict(metadata) if metadata else None)


def load_tensors(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file as ``(tensors, metadata)``; damage raises ``CheckpointError``."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"no checkpoint file at {file}")
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error type and OSError
        raise CheckpointError(
            f"{file} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None
    return tensors, metadata


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's tensors as ``meta`` tensors (name, shape, dtype; no data read).

    Lets names, shapes and dtypes be checked before the file's data is read. A dtype
    torch does not have is refused by tensor name (``CheckpointError``).
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"no checkpoint file at {file}")
    specs: dict[str, Tensor] = {}
    unknown: list[str] = []
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            for key in handle.keys():  # noqa: SIM118
                piece = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    unknown.append(f"{key} ({piece.get_dtype()})")
                    continue
                specs[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    except Exception as err:  # safetensors raises its own error type and OSError
        raise CheckpointError(
            f"{file} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None
    if unknown:
        raise CheckpointError(f"{file}: tensors of an unsupported dtype: {_describe(unknown)}")
    return specs, metadata


# --------------------------------------------------------------------------- key checks


def _describe(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    expected: Mapping[str, Tensor], found: Mapping[str, Tensor], *, what: str = "checkpoint"
) -> None:
    """Raise ``CheckpointError`` listing missing, unexpected and mis-shaped keys, if any."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{k} (expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)})"
        for k in set(expected) & set(found)
        if tuple(expected[k].shape) != tuple(found[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_describe(misshaped)}")
    if problems:
        raise CheckpointError(f"{what} does not match the model; " + "; ".join(problems))


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The floating dtypes weights may be stored in (float8 and others are refused)."""


def _dtype_problem(name: str, expected: torch.dtype, found: torch.dtype, cast: bool) -> str | None:
    """Why a tensor of dtype ``found`` cannot go where the module has ``expected``, or None."""
    if found == expected:
        return None
    if found.is_complex:
        return f"{name} (complex {found}, the module's is {expected})"
    if expected.is_floating_point and not found.is_floating_point:
        return f"{name} ({found} integers for {expected} floats)"
    if found.is_floating_point and not expected.is_floating_point:
        return f"{name} ({found} floats for {expected})"
    if found.is_floating_point and found not in FLOAT_DTYPES:
        return f"{name} ({found}: not one of float16, bfloat16, float32, float64)"
    if found.is_floating_point and cast:
        return None
    return f"{name} ({found}, the module's is {expected})"


def load_state_dict(
    module: nn.Module,
    tensors: Mapping[str, Tensor],
    *,
    what: str = "checkpoint",
    cast: bool = False,
) -> None:
    """Load ``tensors`` into ``module`` after checking keys, shapes and dtypes.

    Every tensor must have the dtype of the parameter or buffer it loads into; integers
    for floats, floats for integers and complex numbers are always refused, and so is a
    floating dtype outside [`FLOAT_DTYPES`][diffkit.checkpoint.FLOAT_DTYPES]. ``cast=True``
    converts between those floating dtypes instead. A refusal (``CheckpointError``) names
    the tensors and leaves ``module`` unchanged.
    """
    expected = module.state_dict()
    check_loadable(module, tensors, what=what, cast=cast, expected=expected)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def check_loadable(
    module: nn.Module,
    tensors: Mapping[str, Tensor],
    *,
    what: str = "checkpoint",
    cast: bool = False,
    expected: Mapping[str, Tensor] | None = None,
) -> None:
    """What [`load_state_dict`][diffkit.checkpoint.load_state_dict] checks, loading nothing.

    Keys, shapes and dtypes only: ``module`` may live on the ``meta`` device (built
    without memory), so a model from an untrusted config is checked before it is
    materialised.
    """
    expected = module.state_dict() if expected is None else expected
    check_state_dict(expected, tensors, what=what)
    problems = [
        problem
        for key in sorted(tensors)
        if (problem := _dtype_problem(key, expected[key].dtype, tensors[key].dtype, cast))
    ]
    if problems:
        raise CheckpointError(
            f"{what}: tensors of a dtype the model cannot take: {_describe(problems)}"
        )


def check_dtypes(
    tensors: Mapping[str, Tensor], *, what: str = "checkpoint", mixed: Collection[str] = ()
) -> None:
    """Refuse weights whose floating dtypes no module of them can run in, naming the tensors.

    Tensors are grouped by module: the first part of their name (``denoiser.``,
    ``encoder.``, ``text.``). Within a group the floating tensors must share one dtype of
    [`FLOAT_DTYPES`][diffkit.checkpoint.FLOAT_DTYPES] (a group named in ``mixed`` may
    hold several, as a module deliberately saved in mixed precision does); complex tensors
    are refused everywhere. Raises ``CheckpointError`` listing the odd tensors.
    """
    groups: dict[str, dict[torch.dtype, list[str]]] = {}
    problems: list[str] = []
    for name in sorted(tensors):
        dtype = tensors[name].dtype
        if dtype.is_complex:
            problems.append(f"{name} (complex {dtype})")
        elif dtype.is_floating_point and dtype not in FLOAT_DTYPES:
            problems.append(f"{name} ({dtype}: not one of float16, bfloat16, float32, float64)")
        elif dtype.is_floating_point:
            groups.setdefault(name.split(".", 1)[0], {}).setdefault(dtype, []).append(name)
    for group, by_dtype in groups.items():
        if len(by_dtype) < 2 or group in mixed:
            continue
        # The dtype most tensors have is the module's; the others are named.
        common = max(by_dtype, key=lambda d: len(by_dtype[d]))
        problems += [
            f"{name} ({dtype}, the rest of '{group}' is {common})"
            for dtype, names in by_dtype.items()
            if dtype != common
            for name in names
        ]
    if problems:
        raise CheckpointError(
            f"{what}: tensors of a dtype the model cannot run in: {_describe(problems)}"
        )


def _take(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- nested states

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"
_FLOAT = "__float__"


def flatten_state(obj: Any, prefix: str) -> tuple[Any, dict[str, Tensor]]:
    """Split a nested state (dicts, lists, tensors, numbers) into JSON-able data + tensors.

    Each tensor is replaced by ``{"__tensor__": key}`` and returned under that key
    (``prefix`` + its path); the inverse is [`unflatten_state`][diffkit.checkpoint.unflatten_state].
    """
    tensors: dict[str, Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, Tensor):
            tensors[path] = value
            return {_TENSOR: path}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: walk(v, f"{path}.{k}") for k, v in value.items()}
            for k in value:
                if not isinstance(k, str | int | float | bool) and k is not None:
                    raise TypeError(f"cannot store a dict key of type {type(k).__name__}")
            return {_ITEMS: [[k, walk(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, float) and not np.isfinite(value):
            return {_FLOAT: repr(value)}
        if value is None or isinstance(value, str | int | float | bool):
            return value
        raise TypeError(f"cannot store a value of type {type(value).__name__} at '{path}'")

    return walk(obj, prefix), tensors


def unflatten_state(structure: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Rebuild the nested state that [`flatten_state`][diffkit.checkpoint.flatten_state] split."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if _TENSOR in value:
                key = value[_TENSOR]
                if key not in tensors:
                    raise CheckpointError(f"checkpoint is missing the tensor '{key}'")
                return tensors[key]
            if _TUPLE in value:
                return tuple(walk(v) for v in value[_TUPLE])
            if _ITEMS in value:
                return {k: walk(v) for k, v in value[_ITEMS]}
            if _FLOAT in value:
                return float(value[_FLOAT])
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(structure)


# --------------------------------------------------------------------------- RNG states


def get_rng_state() -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The global RNG states (torch CPU/CUDA, NumPy, Python): ``(json_part, tensors)``."""
    tensors: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    info = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return info, tensors


def set_rng_state(info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    """Restore what [`get_rng_state`][diffkit.checkpoint.get_rng_state] captured."""
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda = sorted(
        (int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda.")
    )
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [v.to(torch.uint8) for _, v in cuda[: torch.cuda.device_count()]]
        )
    if "numpy" in info and "rng.numpy" in tensors:
        kind, pos, has_gauss, cached = info["numpy"]
        keys = tensors["rng.numpy"].numpy().astype(np.uint32)
        np.random.set_state((kind, keys, int(pos), int(has_gauss), float(cached)))  # noqa: NPY002
    if "python" in info:
        version, internal, gauss = info["python"]
        random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- training checkpoints


class TrainingState:
    """What a training checkpoint restores besides the weights: the step and free-form extras."""

    def __init__(
        self, step: int, extra: dict[str, Any], rank_rng: dict[str, Tensor] | None = None
    ) -> None:
        self.step = step
        self.extra = extra
        self.rank_rng = rank_rng or {}
        """Every process's RNG states as saved (``rank_rng=``), e.g. ``{"torch": (W, n)}``."""

    def __repr__(self) -> str:
        return f"TrainingState(step={self.step}, extra={self.extra})"


def save_training_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
    scaler: Any | None = None,
    extra: Mapping[str, Any] | None = None,
    rank_rng: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write model, EMA, optimizer, step, RNG states (and ``extra``) to one file, atomically.

    ``rank_rng``: RNG states of every process of a multi-process run, each stacked by
    rank (``{"torch": (world_size, n) uint8}``); stored under ``rng.rank.*`` and given
    back by ``load_training_checkpoint`` as ``TrainingState.rank_rng``.
    """
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    header: dict[str, Any] = {"step": int(step), "extra": dict(extra or {})}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    if optimizer is not None:
        structure, opt_tensors = flatten_state(optimizer.state_dict(), "optimizer")
        header["optimizer"] = structure
        header["optimizer_class"] = type(optimizer).__name__
        tensors.update(opt_tensors)
    if scaler is not None:
        structure, scaler_tensors = flatten_state(scaler.state_dict(), "scaler")
        header["scaler"] = structure
        tensors.update(scaler_tensors)
    rng_info, rng_tensors = get_rng_state()
    header["rng"] = rng_info
    tensors.update(rng_tensors)
    tensors.update({f"{_RANK_RNG}{k}": v for k, v in (rank_rng or {}).items()})
    metadata = {"format": FORMAT, "version": VERSION, "state": json.dumps(header)}
    remove_stale_temporaries(Path(path).parent)
    save_tensors(path, tensors, metadata)
    return Path(path)


def load_training_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
    scaler: Any | None = None,
    restore_rng: bool = True,
) -> TrainingState:
    """Restore model, EMA, optimizer, scaler and RNG states from a training checkpoint.

    Everything is checked before anything is loaded: a checkpoint that is refused
    (``CheckpointError``) leaves the model, EMA, optimizer and scaler as they were.
    """
    tensors, metadata = load_tensors(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a diffkit training checkpoint (format={metadata.get('format')!r})"
        )
    try:
        header = json.loads(metadata["state"])
        step = int(header["step"])
    except (KeyError, TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: the checkpoint header is damaged: {err!r}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the checkpoint header is damaged (not an object)")
    named = _CHECKPOINT_RE.match(Path(path).name)
    if named is not None and int(named.group(1)) != step:
        raise CheckpointError(
            f"{path}: the header says step {step} but the file name says step "
            f"{int(named.group(1))} (a renamed or damaged checkpoint)"
        )

    # 1. Check everything; nothing is touched yet.
    model_tensors = _take(tensors, "model.")
    check_state_dict(model.state_dict(), model_tensors, what=f"{path} (model)")
    ema_tensors: dict[str, Tensor] = {}
    if ema is not None:
        ema_tensors = _take(tensors, "ema.")
        if not ema_tensors:
            raise CheckpointError(f"{path} holds no EMA weights")
        check_state_dict(ema.state_dict(), ema_tensors, what=f"{path} (ema)")
    opt_state: Any = None
    if optimizer is not None:
        if "optimizer" not in header:
            raise CheckpointError(f"{path} holds no optimizer state")
        opt_state = unflatten_state(header["optimizer"], tensors)
        _check_optimizer_state(optimizer, opt_state, header.get("optimizer_class"), str(path))
    scaler_state: Any = None
    if scaler is not None and "scaler" in header:
        scaler_state = unflatten_state(header["scaler"], tensors)
        if not isinstance(scaler_state, dict):
            raise CheckpointError(f"{path}: the gradient scaler state is damaged")
    if restore_rng and "rng.torch" not in tensors:
        raise CheckpointError(f"{path} holds no RNG state (load it with restore_rng=False)")

    # 2. Load. The optimizer goes first: torch may still refuse it, and it can be rolled back.
    if optimizer is not None:
        _load_optimizer(optimizer, opt_state, str(path))
    load_state_dict(model, model_tensors, what=f"{path} (model)")
    if ema is not None:
        load_state_dict(ema, ema_tensors, what=f"{path} (ema)")
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    if restore_rng:
        set_rng_state(header.get("rng", {}), tensors)
    return TrainingState(
        step=step,
        extra=dict(header.get("extra", {})),
        rank_rng=_take(tensors, _RANK_RNG),
    )


# Per-parameter optimizer states that are shaped like the parameter itself.
_ELEMENTWISE_STATE = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta"}
)


def _check_optimizer_state(
    optimizer: torch.optim.Optimizer, state: Any, saved_class: Any, where: str
) -> None:
    """Raise ``CheckpointError`` unless ``state`` fits ``optimizer`` (class, groups, shapes)."""
    mine = type(optimizer).__name__
    if saved_class is not None and saved_class != mine:
        raise CheckpointError(
            f"{where}: the optimizer state was saved from {saved_class}, "
            f"but is being loaded into {mine}"
        )
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("state"), dict)
        or not isinstance(state.get("param_groups"), list)
    ):
        raise CheckpointError(f"{where}: the optimizer state is damaged")
    saved_groups: list[Any] = state["param_groups"]
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise CheckpointError(
            f"{where}: the optimizer state has {len(saved_groups)} parameter group(s), "
            f"the optimizer {len(groups)}"
        )
    params: dict[Any, Tensor] = {}
    for i, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise CheckpointError(f"{where}: the optimizer state is damaged (group {i})")
        if len(saved["params"]) != len(group["params"]):
            raise CheckpointError(
                f"{where}: optimizer group {i} holds {len(saved['params'])} parameters in the "
                f"checkpoint, {len(group['params'])} in the optimizer"
            )
        if saved_class is None:  # an older checkpoint: guess the class from the hyper-parameters
            unknown = sorted(set(saved) - set(group) - {"params", "param_names"})
            if unknown:
                raise CheckpointError(
                    f"{where}: the optimizer state has hyper-parameters {unknown} that {mine} "
                    "does not have (saved from a different optimizer class?)"
                )
        params.update(zip(saved["params"], group["params"], strict=True))
    misshaped = []
    for index, param_state in state["state"].items():
        param = params.get(index)
        if param is None or not isinstance(param_state, dict):
            continue
        for key, value in param_state.items():
            shaped = key in _ELEMENTWISE_STATE and isinstance(value, Tensor)
            if shaped and tuple(value.shape) != tuple(param.shape):
                misshaped.append(
                    f"{index}.{key} (parameter {tuple(param.shape)}, found {tuple(value.shape)})"
                )
    if misshaped:
        raise CheckpointError(
            f"{where}: the optimizer state does not fit the parameters; mis-shaped: "
            + _describe(misshaped)
        )


def _load_optimizer(optimizer: torch.optim.Optimizer, state: Any, where: str) -> None:
    """``optimizer.load_state_dict(state)``; on failure restore the previous state and raise."""
    # state_dict() references the current tensors (no copy); load_state_dict rebinds, it
    # does not write into them, so this is enough to roll back.
    previous = optimizer.state_dict()
    try:
        optimizer.load_state_dict(state)
    except Exception as err:
        optimizer.load_state_dict(previous)
        raise CheckpointError(f"{where}: optimizer state does not fit: {err!r}") from None


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint written after ``step`` optimizer steps."""
    return f"checkpoint-{step:08d}.safetensors"


def list_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder`` as ``(step, path)``, oldest first.

    An entry with a checkpoint's name that is not a regular file (a directory) raises
    ``CheckpointError``: a run would fail to write that step's checkpoint over it.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match is None:
            continue
        if not entry.is_file():
            raise CheckpointError(
                f"{entry} has a checkpoint's name but is not a regular file; remove or "
                "rename it (a checkpoint of that step could not be written over it)"
            )
        found.append((int(match.group(1)), entry))
    return sorted(found)


def checkpoint_damage(path: str | os.PathLike[str]) -> str | None:
    """Why the training checkpoint ``path`` cannot be resumed from, or None if it is intact.

    Reads the safetensors header only (its tensor table must fit the file, so a
    truncated file is caught) and checks the format, the JSON state and that the state's
    step is the one in the file name. safetensors has no checksum: flipped bits in the
    tensor data are not detected.
    """
    file = Path(path)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own error type and OSError
        return f"not a readable safetensors file (truncated or corrupt?): {_first_line(err)}"
    if metadata.get("format") != FORMAT:
        return f"not a diffkit training checkpoint (format={metadata.get('format')!r})"
    try:
        header = json.loads(metadata["state"])
        step = int(header["step"])
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        return f"the checkpoint header is damaged: {err!r}"
    named = _CHECKPOINT_RE.match(file.name)
    if named is not None and int(named.group(1)) != step:
        return f"the header says step {step} but the file name says step {int(named.group(1))}"
    return None


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest intact checkpoint in ``folder`` (temporary files are never matched).

    A newer checkpoint that is damaged
    ([`checkpoint_damage`][diffkit.checkpoint.checkpoint_damage]) is skipped with a
    ``UserWarning`` saying which and why, so a run resumes from the newest one that loads;
    ``CheckpointError`` if none is intact. Temporary files left by a writer that died are
    removed ([`remove_stale_temporaries`][diffkit.checkpoint.remove_stale_temporaries]).
    """
    remove_stale_temporaries(folder)
    return newest_intact(folder, list_checkpoints(folder), checkpoint_damage, "checkpoint(s)")


def newest_intact(
    folder: str | os.PathLike[str],
    found: list[tuple[int, Path]],
    damage: Callable[[Path], str | None],
    what: str,
) -> Path | None:
    """The newest of ``found`` (``(step, path)``, oldest first) whose ``damage`` is None,
    each newer damaged one skipped with a ``UserWarning``; ``CheckpointError`` if none is
    intact, None if there are none."""
    for _, path in reversed(found):
        problem = damage(path)
        if problem is None:
            return path
        warnings.warn(f"skipping the checkpoint {path}: {problem}", UserWarning, stacklevel=3)
    if found:
        raise CheckpointError(
            f"none of the {len(found)} {what} in {folder} is intact (see the warnings); "
            "remove them to start afresh"
        )
    return None
