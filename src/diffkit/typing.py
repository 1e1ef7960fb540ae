"""Shape aliases and the runtime shape checker used at every public boundary.

Every tensor that crosses a public interface is annotated with a jaxtyping shape
from this module, and every public function or method that takes tensors is
decorated with [`checked`][diffkit.typing.checked]. A call with a wrong shape or
dtype raises [`ShapeError`][diffkit.typing.ShapeError], which names the argument
and the dimension that disagrees.

Checks cost tens of microseconds per checked call (``benchmarks/RESULTS.md``), paid at
public boundaries, not inside networks or sampling loops. They are on by default; set the
environment variable ``DIFFKIT_SHAPE_CHECKS=0`` *before* importing diffkit to
turn them off (read once, at import). ``benchmarks/shape_check_overhead.py``
measures both ways.
"""

import contextlib
import functools
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar, cast

import torch
from jaxtyping import Bool, Float, Int, TypeCheckError, jaxtyped
from torch import Tensor

__all__ = [
    "CHECKS_ENABLED",
    "Image",
    "Latent",
    "Mask",
    "PerItem",
    "Pooled",
    "Prediction",
    "Sample",
    "ShapeError",
    "Time",
    "TokenIds",
    "Tokens",
    "Video",
    "checked",
    "checked_layer",
    "host_range",
    "trusted",
    "warn_at_caller",
]

Prediction = Literal["epsilon", "x0", "v", "flow"]
"""What a denoiser predicts: the noise, the clean data, the velocity
``v = alpha * eps - sigma * x0``, or the rectified-flow velocity ``eps - x0``."""

# Shape aliases. A 1-D shape has a leading space (jaxtyping's convention).
Time = Float[Tensor, " batch"]
"""Continuous diffusion time ``t`` in [0, 1], one per batch item (t=0 data, t=1 noise)."""
PerItem = Float[Tensor, " batch"]
"""One number per batch item, such as ``alpha(t)`` and ``sigma(t)``."""
Sample = Float[Tensor, "batch *shape"]
"""Any batch of data: vectors, images or videos."""
Image = Float[Tensor, "batch channels height width"]
Latent = Float[Tensor, "batch latent_channels latent_height latent_width"]
Video = Float[Tensor, "batch frames channels height width"]
Tokens = Float[Tensor, "batch tokens dim"]
Pooled = Float[Tensor, "batch dim"]
Mask = Bool[Tensor, "batch tokens"]
TokenIds = Int[Tensor, "batch context"]


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in {"0", "false", "off", "no"}


CHECKS_ENABLED: bool = _env_flag("DIFFKIT_SHAPE_CHECKS", True)
"""Whether public functions check shapes at run time (``DIFFKIT_SHAPE_CHECKS``, read once)."""


class ShapeError(TypeError, ValueError):
    """A tensor's shape or dtype does not match the annotation at a public boundary."""


F = TypeVar("F", bound=Callable[..., Any])

_PARAM_RE = re.compile(r"typechecking parameter '([^']+)'")
_RETURN_RE = re.compile(r"checking the return value")
_BINDING_RE = re.compile(r"^(\w+)=(.+)$", re.MULTILINE)


def _dims_of(annotation: Any) -> list[str] | None:
    """The dimension names of a jaxtyping annotation (``None`` if it has none)."""
    dim_str = getattr(annotation, "dim_str", None)
    if not isinstance(dim_str, str):
        return None
    return dim_str.split()


def _describe(annotation: Any) -> str:
    """``Denoiser``, ``Conditioning | None``: an annotation as a reader writes it."""
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", str(annotation)).replace("NoneType", "None")


def _missing_members(annotation: Any, value: object) -> str:
    """``" (missing: prediction)"`` when ``annotation`` is a diffkit protocol ``value`` fails."""
    missing_members = getattr(annotation, "_missing", None)  # diffkit.protocols' metaclass
    missing = missing_members(value) if callable(missing_members) else None
    return f" (missing: {', '.join(missing)})" if isinstance(missing, list) and missing else ""


def _argument(
    fn: Callable[..., Any], param: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    """The value passed for ``param`` and its annotation (``None, None`` if they don't bind)."""
    import inspect

    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        return bound.arguments.get(param), fn.__annotations__.get(param)
    except TypeError:
        return None, None


def _rank_problem(where: str, dims: list[str], shape: tuple[int, ...]) -> str | None:
    """A wrong number of dimensions, said as ``where`` has ... expected ..."""
    fixed = [d for d in dims if not d.startswith("*") and not d.startswith("...")]
    if not any(d.startswith("*") or d == "..." for d in dims) and len(dims) != len(shape):
        return (
            f"{where} has {len(shape)} dimensions {shape}, expected {len(dims)} ({' '.join(dims)})"
        )
    if len(shape) < len(fixed):
        return (
            f"{where} has {len(shape)} dimensions {shape}, expected at least {len(fixed)} "
            f"({' '.join(dims)})"
        )
    return None


def _binding_problem(
    where: str, dims: list[str], shape: tuple[int, ...], bindings: dict[str, str]
) -> str | None:
    """A dimension that disagrees with what the other arguments bound it to.

    Leading named dimensions (before any variadic one) first: this is where nearly every
    real mismatch is ('batch', 'channels'); then the one ``*name`` group, if there is one.
    """
    expected = f"(shape {shape}, expected ({' '.join(dims)}))"
    for index, dim in enumerate(dims):
        if dim.startswith("*") or dim == "...":
            break
        clean = dim.lstrip("#_")
        if clean.isdigit() and int(clean) != shape[index]:
            return f"{where} dimension {index} is {shape[index]}, expected {clean}"
        if clean in bindings and bindings[clean].strip() != str(shape[index]):
            return (
                f"{where} dimension '{clean}' is {shape[index]}, but '{clean}' is "
                f"{bindings[clean].strip()} from the other arguments {expected}"
            )
    variadic = [d for d in dims if d.startswith("*")]
    if len(variadic) != 1:
        return None
    star = dims.index(variadic[0])
    var_name = variadic[0].lstrip("*#_")
    bound = bindings.get(var_name, "").strip()
    if not bound:
        return None
    got = shape[star : len(shape) - (len(dims) - star - 1)]
    return (
        f"{where} dimensions '*{var_name}' are {got}, but '*{var_name}' is "
        f"{bound.removeprefix('torch.Size(').rstrip(')')} from the other arguments {expected}"
    )


def _tensor_problem(where: str, value: Tensor, annotation: Any, bindings: dict[str, str]) -> str:
    """Why the tensor ``value`` fails its jaxtyping ``annotation``: dtype, rank or a dimension."""
    dims = _dims_of(annotation)
    shape = tuple(value.shape)
    dtype = getattr(annotation, "dtypes", None)
    if dtype is not None and not any(str(value.dtype).removeprefix("torch.") in d for d in dtype):
        return f"{where} has dtype {value.dtype}, expected one of {sorted(set(dtype))}"
    if dims is None:
        return f"{where} has the wrong shape {shape}"
    return (
        _rank_problem(where, dims, shape)
        or _binding_problem(where, dims, shape, bindings)
        or f"{where} of shape {shape} does not match ({' '.join(dims)})"
    )


def _explain(
    fn: Callable[..., Any], err: TypeCheckError, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """Turn jaxtyping's message into one line naming the argument and the dimension."""
    text = str(err)
    name = getattr(fn, "__qualname__", repr(fn))
    match = _PARAM_RE.search(text)
    if match is None:
        if _RETURN_RE.search(text):
            return f"{name}: the return value has the wrong shape or dtype"
        return f"{name}: a shape or dtype check failed"
    param = match.group(1)
    value, annotation = _argument(fn, param, args, kwargs)
    if isinstance(value, Tensor):
        bindings = dict(
            _BINDING_RE.findall(text.split("jaxtyping axis annotation are as follows.")[-1])
        )
        return _tensor_problem(f"{name}: argument '{param}'", value, annotation, bindings)
    kind = type(value).__name__
    if _dims_of(annotation) is None:  # not a tensor annotation: a protocol, a union, ...
        return (
            f"{name}: argument '{param}' must be {_describe(annotation)}, got {kind}"
            f"{_missing_members(annotation, value)}"
        )
    return f"{name}: argument '{param}' must be a tensor matching {annotation}, got {kind}"


class _Depth(threading.local):
    """How many checked calls are on this thread's stack (per thread, so threads don't mix).

    ``trusted``: how many [`trusted`][diffkit.typing.trusted] blocks this thread is in.
    """

    value: int = 0
    trusted: int = 0


_DEPTH = _Depth()


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    """Skip every shape check on this thread inside the block.

    For a library's internal calls on tensors it built itself, whose shapes are right by
    construction (e.g. a sampler evaluating its schedule on its own time grid): a check
    there costs tens of microseconds and can never fail. Public boundaries stay checked.
    """
    _DEPTH.trusted += 1
    try:
        yield
    finally:
        _DEPTH.trusted -= 1


def _checking_wrapper(fn: F, *, skip_when_nested: bool) -> F:
    inner = jaxtyped(typechecker=_beartype())(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth = _DEPTH.value
        if _DEPTH.trusted or (skip_when_nested and depth):
            return fn(*args, **kwargs)
        _DEPTH.value = depth + 1
        try:
            return inner(*args, **kwargs)
        except TypeCheckError as err:
            raise ShapeError(_explain(fn, err, args, kwargs) + "\n\n" + str(err)) from None
        finally:
            _DEPTH.value = depth

    return cast(F, wrapper)


def checked(fn: F) -> F:
    """Check the jaxtyping annotations of ``fn`` on every call, unless checks are off.

    Raises ``ShapeError`` naming the argument and the mismatched dimension.
    """
    if not CHECKS_ENABLED:
        return fn
    return _checking_wrapper(fn, skip_when_nested=False)


def checked_layer(fn: F) -> F:
    """Like [`checked`][diffkit.typing.checked], but skipped inside another checked call.

    For the building blocks of a network (residual blocks, attention, ...): called on
    their own they check their arguments like any public function; called from a
    checked model whose boundary already validated the input, the shapes they see are
    fixed by construction, and re-checking them on every layer of every step would
    only cost time.
    """
    if not CHECKS_ENABLED:
        return fn
    return _checking_wrapper(fn, skip_when_nested=True)


@functools.cache
def _beartype() -> Callable[..., Any]:
    from beartype import BeartypeConf, beartype

    # PEP 484's numeric tower, as static checkers read it: an ``int`` goes where a
    # ``float`` is annotated (``classifier_free(..., scale=3)``, ``value_range=(0, 255)``).
    return beartype(conf=BeartypeConf(is_pep484_tower=True))


_WRAPPERS = ("jaxtyping", "beartype", "torch.utils._contextlib")
"""Modules whose frames sit between diffkit's functions and their callers (decorators)."""


def _internal(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in ("diffkit", *_WRAPPERS))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the first frame outside diffkit and its decorators."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and _internal(frame.f_globals.get("__name__", "")):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level + 1)


def broadcast_to_sample(per_item: PerItem, like: Tensor) -> Tensor:
    """Reshape a per-item scalar ``(batch,)`` so it broadcasts against ``like`` ``(batch, ...)``."""
    return per_item.reshape(per_item.shape + (1,) * (like.ndim - 1))


def host_range(x: Tensor) -> tuple[float, float] | None:
    """``(min, max)`` of a non-empty CPU tensor in one reduction, else ``None``.

    For value checks at a boundary (labels, times, indices): on an accelerator, reading
    values back would be a host-device sync on every call, so they are not looked at
    there. NaN anywhere makes both ends NaN, which fails every range comparison.
    """
    if x.device.type != "cpu" or x.numel() == 0:
        return None
    low, high = torch.aminmax(x)
    return float(low), float(high)


def is_finite(x: Tensor) -> Tensor:
    """A 0-d boolean tensor: whether every element of ``x`` is finite (no host sync)."""
    return torch.isfinite(x).all()
