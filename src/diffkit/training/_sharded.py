"""Sharded training checkpoints: ``torch.distributed.checkpoint`` (DCP) into safetensors.

A sharded checkpoint is a folder ``checkpoint-00000100/`` that every process writes its
own part of, through DCP's ``HuggingFaceStorageWriter``: ``shard-0000N-*.safetensors``
files (a ``DTensor`` shard under FSDP; under DDP each replicated tensor is written once,
by one rank) whose JSON headers hold where each piece sits in the whole tensor, and a
JSON manifest ``diffkit.json`` (step, world size, config, the optimizer's non-tensor
state, the files and their sizes). State dicts come from
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` /
``get_optimizer_state_dict`` and go back through ``set_model_state_dict`` /
``set_optimizer_state_dict``, so a checkpoint written by N processes loads on M:
DCP's reader cuts each rank's pieces out of the saved ones.

Nothing on disk is pickled, and loading unpickles nothing: tensors are in safetensors,
everything else is JSON. (DCP's default ``FileSystemWriter`` would ``torch.save`` each
tensor and ``pickle.dump`` its ``.metadata`` file, which its reader ``pickle.load``s:
loading such a folder from an untrusted source can run code. It is not used here.)
Between the processes of one job DCP exchanges its save and load plans as pickled
objects over ``torch.distributed``; nothing read from the folder takes that path.

Atomic like the single-file checkpoints: every rank writes into a temporary folder
``.checkpoint-00000100.<host>-<pid>.<random>.tmp`` (its files fsynced); then rank 0
writes the manifest, fsyncs, and renames the folder into place. A process killed at any
moment leaves the previous checkpoints whole and, at worst, a temporary folder that the
next run removes (when its writer, on this host, no longer runs). A folder with a
checkpoint's name whose manifest or files are missing or the wrong size is skipped with
a warning when resuming, like a damaged single-file checkpoint; there is no checksum.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from diffkit.checkpoint import (
    _HOST,
    CheckpointError,
    _alive,
    _fsync_dir,
    check_state_dict,
    flatten_state,
    get_rng_state,
    load_state_dict,
    newest_intact,
    set_rng_state,
    unflatten_state,
)
from diffkit.training._distributed import DistributedInfo, barrier, reseed_rank

if TYPE_CHECKING:
    from diffkit.pipeline import Pipeline

__all__ = [
    "ShardedState",
    "export_pipeline",
    "latest_sharded_checkpoint",
    "list_sharded_checkpoints",
    "load_consolidated",
    "load_sharded_checkpoint",
    "remove_stale_sharded_temporaries",
    "save_sharded_checkpoint",
    "sharded_checkpoint_damage",
    "sharded_checkpoint_name",
]

FORMAT = "diffkit-sharded-checkpoint"
VERSION = "1"
MANIFEST = "diffkit.json"
_SHARDED_RE = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY_RE = re.compile(r"^\.(?P<name>checkpoint-\d+)\.(?P<host>\w+)-(?P<pid>\d+)\.[^.]+\.tmp$")
_RANK = "rank."
_NAME_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class ShardedState:
    """What loading a sharded checkpoint gives back besides the weights."""

    step: int
    world_size: int
    """How many processes wrote it."""
    extra: dict[str, Any]


def sharded_checkpoint_name(step: int) -> str:
    """The folder name of the sharded checkpoint written after ``step`` optimizer steps."""
    return f"checkpoint-{step:08d}"


def list_sharded_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Sharded checkpoints (folders) in ``folder`` as ``(step, path)``, oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _SHARDED_RE.match(entry.name)
        if match is not None and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


# --------------------------------------------------------------------------- state dicts


def _state_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, ema: nn.Module | None
) -> tuple[dict[str, Tensor], Any]:
    """The tensors to save or fill (``model.*``, ``optimizer.*``, ``ema.*``) and the
    optimizer's JSON structure (its non-tensor state)."""
    tensors: dict[str, Tensor] = {}
    for key, value in get_model_state_dict(model).items():
        if not isinstance(value, Tensor):  # get_model_state_dict may hand back other values
            raise TypeError(f"cannot store 'model.{key}' ({type(value).__name__}) in a checkpoint")
        tensors[f"model.{key}"] = value
    structure = None
    if optimizer is not None:
        state = get_optimizer_state_dict(model, optimizer)
        structure, opt_tensors = flatten_state(state, "optimizer")
        tensors.update(opt_tensors)
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    return tensors, structure


def _rank_rng(info: DistributedInfo) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """This rank's RNG states, its tensors under ``rank.<r>.``."""
    json_part, tensors = get_rng_state()
    return json_part, {f"{_RANK}{info.rank}.{k}": v for k, v in tensors.items()}


# --------------------------------------------------------------------------- saving


def save_sharded_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    step: int,
    info: DistributedInfo,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
    scaler: Any | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Every rank: write model, optimizer, EMA, step and every rank's RNG states, atomically.

    Collective: every process of the job calls it with the same ``path``.
    """
    target = Path(path)
    tensors, structure = _state_tensors(model, optimizer, ema)
    rng_json, rng_tensors = _rank_rng(info)
    tensors.update(rng_tensors)
    tmp = _shared_temporary(target, info, device)
    try:
        with _single_process_quietly():
            dcp.save(
                {k: v.detach() for k, v in tensors.items()},
                storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True),
                no_dist=info.world_size == 1,
            )
        barrier(info)
        if info.is_main:
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "step": int(step),
                "world_size": info.world_size,
                "optimizer": structure,
                "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
                "scaler": flatten_state(scaler.state_dict(), "scaler")[0] if scaler else None,
                "rng": rng_json,  # rank 0's Python and NumPy states
                "extra": dict(extra or {}),
            }
            _publish(tmp, target, manifest)
    finally:
        barrier(info)
        if info.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns on every single-process save and load, which is what is asked for here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _shared_temporary(target: Path, info: DistributedInfo, device: torch.device) -> Path:
    """Rank 0 makes the temporary folder (after removing dead writers'); all get its path."""
    name = b""
    if info.is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_sharded_temporaries(target.parent)
        name = _temporary(target).name.encode()
    if info.world_size == 1:
        return target.parent / name.decode()
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = torch.zeros(_NAME_BYTES, dtype=torch.uint8, device=on)
    if info.is_main:
        buffer[: len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    raw = bytes(buffer.cpu().tolist()).rstrip(b"\0")
    return target.parent / raw.decode()


def _temporary(target: Path) -> Path:
    """A new temporary folder beside ``target``, named after it, this host and process."""
    prefix = f".{target.name}.{_HOST}-{os.getpid()}."
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))


def _publish(tmp: Path, target: Path, manifest: dict[str, Any]) -> None:
    """Rank 0: list the written files in the manifest, fsync it, rename ``tmp`` to ``target``."""
    files = sorted(p for p in tmp.iterdir() if p.suffix == ".safetensors")
    manifest["files"] = {p.name: p.stat().st_size for p in files}
    with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if target.exists():  # the same step again (its earlier copy was damaged): set it aside
        _discard(target)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _discard(folder: Path) -> None:
    """Remove a checkpoint folder: renamed to a temporary name first, so that a process
    killed while deleting never leaves a half-deleted folder under a checkpoint's name."""
    aside = _temporary(folder)
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def prune_sharded_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Rank 0: remove all but the newest ``keep`` sharded checkpoints; return the removed."""
    removed = [path for _, path in list_sharded_checkpoints(folder)[:-keep]]
    for path in removed:
        _discard(path)
    return removed


def remove_stale_sharded_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary checkpoint folders in ``folder`` whose writer died; return them.

    Only folders of the temporary pattern made on this host by a process that no longer
    runs are removed.
    """
    root = Path(folder)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        match = _TEMPORARY_RE.match(entry.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# --------------------------------------------------------------------------- checking


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the sharded checkpoint ``path``; ``CheckpointError`` if it is damaged."""
    damage = sharded_checkpoint_damage(path)
    if damage is not None:
        raise CheckpointError(f"{path}: {damage}")
    return json.loads((path / MANIFEST).read_text(encoding="utf-8"))


def sharded_checkpoint_damage(path: str | os.PathLike[str]) -> str | None:
    """Why the sharded checkpoint ``path`` cannot be resumed from, or None if it is intact.

    Checks the manifest (format, step against the folder name) and that the folder holds
    exactly the listed ``.safetensors`` files at their recorded sizes.
    """
    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        return f"no readable manifest {MANIFEST}: {' '.join(str(err).split())[:200]}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"not a diffkit sharded checkpoint ({MANIFEST} has no format {FORMAT!r})"
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        return f"the manifest {MANIFEST} is damaged"
    named = _SHARDED_RE.match(folder.name)
    if named is not None and int(named.group(1)) != manifest["step"]:
        return f"the manifest says step {manifest['step']} but the folder name says {named[1]}"
    present = {p.name: p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors"}
    if present != files:
        return f"its files {present} are not the ones its manifest lists ({files})"
    try:
        _saved_tensors(folder)  # the headers parse, and the pieces cover every tensor
    except CheckpointError as err:
        return str(err).removeprefix(f"{folder}: ")
    return None


def latest_sharded_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest intact sharded checkpoint in ``folder`` (damaged ones skipped with a warning).

    ``CheckpointError`` if there are some and none is intact; temporary folders of writers
    that died are removed first.
    """
    remove_stale_sharded_temporaries(folder)
    found = list_sharded_checkpoints(folder)
    return newest_intact(folder, found, sharded_checkpoint_damage, "sharded checkpoint(s)")


def _saved_tensors(path: Path) -> dict[str, Tensor]:
    """The checkpoint's whole tensors as ``meta`` tensors (from the safetensors headers).

    ``CheckpointError`` unless the saved pieces of every tensor cover all of it (a file of
    another host missing from a folder that was not on a shared file system, say).
    """
    try:
        metadata = HuggingFaceStorageReader(str(path)).read_metadata()
    except Exception as err:  # safetensors raises its own error type, and OSError
        raise CheckpointError(f"{path}: unreadable shard files: {err}") from None
    specs: dict[str, Tensor] = {}
    gaps: list[str] = []
    for key, item in metadata.state_dict_metadata.items():
        size = getattr(item, "size", None)
        properties = getattr(item, "properties", None)
        chunks = getattr(item, "chunks", None)
        if size is None or properties is None or chunks is None:
            raise CheckpointError(f"{path}: '{key}' is not a tensor")
        if sum(math.prod(chunk.sizes) for chunk in chunks) != math.prod(size):
            gaps.append(key)
        specs[key] = torch.empty(size, dtype=properties.dtype, device="meta")
    if gaps:
        raise CheckpointError(f"{path}: pieces of these tensors are missing: {gaps[:20]}")
    return specs


def _check_tensors(expected: Mapping[str, Tensor], saved: Mapping[str, Tensor], where: str) -> None:
    check_state_dict(expected, saved, what=where)
    odd = [
        f"{k} ({saved[k].dtype}, expected {v.dtype})"
        for k, v in expected.items()
        if saved[k].dtype != v.dtype
    ]
    if odd:
        raise CheckpointError(f"{where}: tensors of another dtype: {', '.join(sorted(odd))}")


# --------------------------------------------------------------------------- loading


def load_sharded_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    info: DistributedInfo,
    device: torch.device,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
    scaler: Any | None = None,
) -> ShardedState:
    """Every rank: restore model, optimizer, EMA, scaler and RNG states, on any world size.

    Everything is checked (manifest, files, names, shapes, dtypes, optimizer class) and
    read before anything is loaded, so a refused checkpoint changes nothing. On the world
    size that wrote it each rank gets its own RNG states back; on another, each rank is
    reseeded from ``(seed, rank, step)`` with a warning.
    """
    folder = Path(path)
    manifest = _read_manifest(folder)
    step, saved_world = int(manifest["step"]), int(manifest.get("world_size", 1))
    _check_optimizer_class(optimizer, manifest, folder)
    fresh = optimizer is not None and not optimizer.state
    try:  # (getting a fresh optimizer's state dict fills its state with zeros)
        targets, _ = _state_tensors(model, optimizer, ema)
        saved = _saved_tensors(folder)
        wanted = ("model.", "optimizer." if optimizer else "model.", "ema." if ema else "model.")
        state = {k: v for k, v in saved.items() if k.startswith(wanted)}  # the parts asked for
        _check_tensors(targets, state, f"{folder} (state)")
    except CheckpointError:
        if fresh and optimizer is not None:
            optimizer.state.clear()  # refused: the optimizer is left as it came
        raise
    own = f"{_RANK}{info.rank}."
    rng = {k: v for k, v in saved.items() if k.startswith(own)}
    buffers = _read(folder, targets, rng if saved_world == info.world_size else {}, info)
    set_model_state_dict(model, dict(_part(buffers, "model.")))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, unflatten_state(manifest["optimizer"], buffers))
    if ema is not None:
        ema.load_state_dict(_part(buffers, "ema."))
    if scaler is not None and manifest.get("scaler") is not None:
        scaler.load_state_dict(unflatten_state(manifest["scaler"], {}))
    if saved_world == info.world_size:
        set_rng_state(manifest.get("rng", {}) if info.is_main else {}, _part(buffers, own))
    else:
        reseed_rank(saved_world, folder, info, seed, step)
    return ShardedState(step=step, world_size=saved_world, extra=dict(manifest.get("extra", {})))


def _part(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _read(
    folder: Path,
    targets: Mapping[str, Tensor],
    rng: Mapping[str, Tensor],
    info: DistributedInfo,
) -> dict[str, Tensor]:
    """Read this rank's pieces of ``targets`` (and the ``rng`` tensors) into new tensors."""
    buffers = {k: torch.empty_like(v) for k, v in targets.items()}
    buffers.update({k: torch.empty(v.shape, dtype=v.dtype) for k, v in rng.items()})
    with _single_process_quietly():
        dcp.load(
            buffers,
            storage_reader=HuggingFaceStorageReader(str(folder)),
            no_dist=info.world_size == 1,
        )
    return buffers


def _check_optimizer_class(
    optimizer: torch.optim.Optimizer | None, manifest: Mapping[str, Any], folder: Path
) -> None:
    if optimizer is None:
        return
    if manifest.get("optimizer") is None:
        raise CheckpointError(f"{folder} holds no optimizer state")
    saved, mine = manifest.get("optimizer_class"), type(optimizer).__name__
    if saved != mine:
        raise CheckpointError(
            f"{folder}: the optimizer state was saved from {saved}, but is being loaded into {mine}"
        )


def load_consolidated(
    path: str | os.PathLike[str], *, weights: Literal["ema", "model"] = "ema"
) -> dict[str, Tensor]:
    """The whole (unsharded) model or EMA weights of a sharded checkpoint, read in this process.

    Needs no process group and joins none: every shard file is read here.
    """
    folder = Path(path)
    _read_manifest(folder)
    prefix = "ema.module." if weights == "ema" else "model."
    specs = {k: v for k, v in _saved_tensors(folder).items() if k.startswith(prefix)}
    if not specs:
        raise CheckpointError(f"{folder} holds no {weights} weights")
    buffers = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in specs.items()}
    with _single_process_quietly():
        dcp.load(buffers, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    return {k[len(prefix) :]: v for k, v in buffers.items()}


def export_pipeline(
    pipeline: "Pipeline",
    source: str | os.PathLike[str],
    to: str | os.PathLike[str],
    *,
    weights: Literal["ema", "model"] = "ema",
) -> Path:
    """Save ``pipeline`` with the trained denoiser weights of a sharded run, consolidated.

    ``source`` is a sharded checkpoint folder, or a run's ``output_dir`` (its newest intact
    checkpoint is used). The pipeline is saved like ``pipeline.save(to)`` (``config.json`` +
    safetensors) and loads with ``Pipeline.load``. Reads every shard in this process; no
    process group is needed.
    """
    checkpoint = _find_checkpoint(Path(source))
    tensors = load_consolidated(checkpoint, weights=weights)
    denoiser = pipeline.denoiser
    if not isinstance(denoiser, nn.Module):
        raise TypeError("export_pipeline: the pipeline's denoiser must be an nn.Module")
    load_state_dict(denoiser, tensors, what=f"{checkpoint} ({weights})", cast=True)
    pipeline.save(to)
    return Path(to)


def _find_checkpoint(source: Path) -> Path:
    if (source / MANIFEST).is_file():
        return source
    folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    found = latest_sharded_checkpoint(folder)
    if found is None:
        raise CheckpointError(f"no sharded checkpoint in {folder}")
    return found
