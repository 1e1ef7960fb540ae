"""diffusers' ``UNet3DConditionModel`` (ModelScope text-to-video) <-> diffkit's space-time U-Net.

A ``UNet3DConditionModel`` is a [`UNet`][diffkit.nn.unet.UNet] with
``temporal=TemporalConfig()``: the 2-D residual blocks, spatial transformers and resampling
are the image U-Net's (and rename as in ``UNet2DConditionModel``); ``temp_convs`` become
``temporal_conv`` ([`TemporalConv`][diffkit.nn.resblocks.TemporalConv]), ``temp_attentions``
become ``temporal_attn`` and ``transformer_in`` becomes ``temporal_in``
([`TemporalTransformer`][diffkit.nn.attention.TemporalTransformer]). Its spatial
transformers project linearly (``linear_projection=True``).

The converted network takes videos ``(batch, frames, channels, h, w)`` where diffusers takes
``(batch, channels, frames, h, w)``, and ``t = (timestep + 1) / N`` as every converted U-Net.
diffusers' ``attention_mask`` argument is not applied by its 3-D blocks: condition the
converted network without ``Conditioning.mask`` (or with an all-True one) to match it.
Used by [`from_diffusers`][diffkit.interop.from_diffusers] /
[`to_diffusers`][diffkit.interop.to_diffusers]; every config field that would convert to a
different network is refused by name.
"""

import math
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from diffkit.nn.unet import TemporalConfig, UNetConfig
from diffkit.typing import Prediction

__all__ = [
    "VIDEO_UNETS",
    "unet3d_config",
    "unet3d_kwargs",
    "video_keys_to_diffkit",
    "video_keys_to_diffusers",
]

VIDEO_UNETS = ("UNet3DConditionModel",)

_DOWN = {"DownBlock3D": False, "CrossAttnDownBlock3D": True}
_UP = {"UpBlock3D": False, "CrossAttnUpBlock3D": True}
_INPUT_HEADS = 8  # diffusers builds transformer_in with 8 heads of attention_head_dim
_CONV_DROPOUT = 0.1  # and its TemporalConvLayers with dropout 0.1


def _refuse(name: str, value: Any, supported: Any) -> ValueError:
    return ValueError(
        f"UNet3DConditionModel: {name}={value!r} is not supported (supported: {supported})"
    )


def _check_options(cfg: Mapping[str, Any]) -> None:
    """Refuse the UNet3DConditionModel options the space-time U-Net does not have."""
    if cfg.get("act_fn") not in ("silu", "swish"):
        raise _refuse("act_fn", cfg.get("act_fn"), ["silu", "swish"])
    if cfg.get("norm_num_groups") is None:
        raise _refuse("norm_num_groups", None, "an int")
    for name in ("time_cond_proj_dim", "num_attention_heads"):
        if cfg.get(name) is not None:
            raise _refuse(name, cfg.get(name), [None])
    if cfg.get("cross_attention_dim") is None:
        raise _refuse("cross_attention_dim", None, "an int")


def _attention_levels(cfg: Mapping[str, Any]) -> list[bool]:
    """Which levels have (cross- and temporal) attention; the up blocks mirror the down."""
    down = []
    for name in cfg["down_block_types"]:
        if name not in _DOWN:
            raise _refuse("down_block_types", cfg["down_block_types"], list(_DOWN))
        down.append(_DOWN[name])
    up = []
    for name in reversed(cfg["up_block_types"]):
        if name not in _UP:
            raise _refuse("up_block_types", cfg["up_block_types"], list(_UP))
        up.append(_UP[name])
    if down != up:
        raise _refuse(
            "up_block_types", cfg["up_block_types"], f"the mirror of {cfg['down_block_types']}"
        )
    return down


def _head_dim(cfg: Mapping[str, Any]) -> int:
    """Channels per head: diffusers' 3-D blocks read ``attention_head_dim`` as that."""
    value = cfg["attention_head_dim"]
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise _refuse("attention_head_dim", tuple(value), "one value for every level")
        value = value[0]
    return int(value)


def unet3d_config(
    module: Any,
    prediction: Prediction | None,
    num_train_timesteps: int | None,
    record: Mapping[str, Any],
) -> UNetConfig:
    """The [`UNetConfig`][diffkit.nn.unet.UNetConfig] (with ``temporal``) of a diffusers
    ``UNet3DConditionModel``; ``record``: what ``to_diffusers`` stored under ``_diffkit``."""
    cfg = module.config
    _check_options(cfg)
    attention = _attention_levels(cfg)
    widths = list(cfg["block_out_channels"])
    base = math.gcd(*widths)
    n_train = num_train_timesteps or record.get("num_train_timesteps") or 1000
    return UNetConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        blocks_per_level=cfg["layers_per_block"],
        attention_resolutions=tuple(2**i for i, a in enumerate(attention) if a),
        attention_head_dim=_head_dim(cfg),
        mid_attention=True,
        linear_projection=True,
        context_dim=cfg["cross_attention_dim"],
        norm_groups=cfg["norm_num_groups"],
        norm_eps=cfg["norm_eps"],
        time_embed_dim=4 * widths[0],
        flip_sin_to_cos=True,
        freq_shift=0.0,
        mid_scale=cfg["mid_block_scale_factor"],
        downsample_padding=cfg["downsample_padding"],
        prediction=prediction or record.get("prediction", "epsilon"),
        time_input=record.get("time_input", "index"),
        time_scale=record.get("time_scale", 1000.0),
        num_train_timesteps=int(n_train),
        temporal=TemporalConfig(input_heads=_INPUT_HEADS, dropout=_CONV_DROPOUT),
    )


def _refuse_export(name: str, value: Any, supported: Any) -> ValueError:
    return ValueError(
        f"to_diffusers: a UNet3DConditionModel cannot express {name}={value!r} (it has {supported})"
    )


def unet3d_kwargs(c: UNetConfig) -> dict[str, Any]:
    """The ``UNet3DConditionModel`` config of a space-time U-Net; refuses what it lacks."""
    tc = c.temporal
    if tc is None:
        raise ValueError("to_diffusers: UNet3DConditionModel needs UNetConfig.temporal")
    fixed: list[tuple[str, Any, Any]] = [
        ("temporal.conv", tc.conv, True),
        ("temporal.attention", tc.attention, True),
        ("temporal.input_heads", tc.input_heads, _INPUT_HEADS),
        ("temporal.dropout", tc.dropout, _CONV_DROPOUT),
        ("temporal.positions", tc.positions, "none"),
        ("temporal.cross_attention", tc.cross_attention, False),
        ("temporal.frame_patch", tc.frame_patch, 1),
        ("num_heads", c.num_heads, None),
        ("mid_attention", c.mid_attention, True),
        ("transformer_depth", c.transformer_depth, 1),
        ("linear_projection", c.linear_projection, True),
        ("num_classes", c.num_classes, None),
        ("pooled_dim", c.pooled_dim, None),
        ("micro_conditions", c.micro_conditions, 0),
        ("scale_shift", c.scale_shift, False),
        ("dropout", c.dropout, 0.0),
        ("flip_sin_to_cos", c.flip_sin_to_cos, True),
        ("freq_shift", c.freq_shift, 0.0),
        ("center_input", c.center_input, False),
        ("time_embed_dim", c.time_embed_dim, (None, 4 * c.base_channels * c.channel_mult[0])),
    ]
    for name, value, supported in fixed:
        if value != supported and not (isinstance(supported, tuple) and value in supported):
            raise _refuse_export(name, value, supported)
    if c.context_dim is None:
        raise _refuse_export("context_dim", None, "cross-attention: an int")
    widths = [c.base_channels * m for m in c.channel_mult]
    attention = [2**i in c.attention_resolutions for i in range(len(widths))]
    return {
        "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels,
        "down_block_types": tuple(
            "CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attention
        ),
        "up_block_types": tuple(
            "CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(attention)
        ),
        "block_out_channels": tuple(widths),
        "layers_per_block": c.blocks_per_level,
        "downsample_padding": c.downsample_padding,
        "mid_block_scale_factor": c.mid_scale,
        "act_fn": "silu",
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "cross_attention_dim": c.context_dim,
        "attention_head_dim": c.attention_head_dim,
    }


# (diffusers pattern, diffkit replacement) and back: the temporal layers' names. The 2-D
# parts around them rename with the image U-Net's rules.
_TEMPORAL_NAMES = [
    (r"(^|\.)temp_convs\.", r"\1temporal_conv.", r"(^|\.)temporal_conv\.", r"\1temp_convs."),
    (
        r"(^|\.)temp_attentions\.",
        r"\1temporal_attn.",
        r"(^|\.)temporal_attn\.",
        r"\1temp_attentions.",
    ),
    (r"^transformer_in\.", "temporal_in.", r"^temporal_in\.", "transformer_in."),
]
# TemporalConvLayer: conv{k}.0 is a GroupNorm, conv1.2 / conv{2,3,4}.3 a Conv3d
_CONV_STAGE = re.compile(r"\.conv([1-4])\.([023])\.")
_DIFFKIT_STAGE = re.compile(r"\.(norms|convs)\.([0-3])\.")


def _to_diffkit_stage(match: re.Match[str]) -> str:
    kind = "norms" if match.group(2) == "0" else "convs"
    return f".{kind}.{int(match.group(1)) - 1}."


def _to_diffusers_stage(match: re.Match[str]) -> str:
    stage = int(match.group(2))
    position = 0 if match.group(1) == "norms" else (2 if stage == 0 else 3)
    return f".conv{stage + 1}.{position}."


def video_keys_to_diffkit(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ``UNet3DConditionModel`` state dict with its temporal layers under diffkit's names."""
    out: dict[str, Tensor] = {}
    for key, value in source.items():
        for pattern, replacement, _, _ in _TEMPORAL_NAMES:
            key = re.sub(pattern, replacement, key)
        if ".temporal_conv." in key:
            key = _CONV_STAGE.sub(_to_diffkit_stage, key)
        out[key] = value
    return out


def video_keys_to_diffusers(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``video_keys_to_diffkit``, on a state dict already under diffusers'
    2-D names."""
    out: dict[str, Tensor] = {}
    for key, value in source.items():
        if ".temporal_conv." in key:
            key = _DIFFKIT_STAGE.sub(_to_diffusers_stage, key)
        for _, _, pattern, replacement in _TEMPORAL_NAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out
