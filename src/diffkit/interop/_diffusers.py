"""Conversions between diffusers models and diffkit networks (weights and configs).

``from_diffusers(module)`` reads a diffusers ``UNet2DModel``, ``UNet2DConditionModel``,
``UNet3DConditionModel`` or ``AutoencoderKL`` *instance* (no downloads here: load it with
diffusers first) and returns the equivalent diffkit module with the same weights:

- a U-Net becomes a [`UNet`][diffkit.nn.unet.UNet] with ``time_input="index"``: called with
  ``t = Discrete.t_from_index(timestep)`` of the model's ``N = num_train_timesteps`` step
  schedule (``t = (timestep + 1) / N``) and ``Conditioning(tokens=encoder_hidden_states,
  mask=encoder_attention_mask.bool(), labels=class_labels)`` it returns what diffusers returns
  for ``timestep``. diffusers does not store what a U-Net predicts (its scheduler does), so
  pass ``prediction=`` (default ``"epsilon"``). Stable Diffusion's pipelines pass no
  ``encoder_attention_mask``: the U-Net attends to every token, padding included, so condition
  it with a text conditioner built with ``mask_padding=False`` (and, for SD 1.x's tokenizer,
  ``pad_token_id=49407``).
- a U-Net that ``to_diffusers`` exported carries diffkit's ``time_input``, ``time_scale``,
  ``num_train_timesteps`` and ``prediction`` in a private ``_diffkit`` config entry (kept by
  ``save_pretrained`` / ``from_pretrained`` / ``from_config``, ignored by diffusers); those
  come back, so ``from_diffusers(to_diffusers(m))`` computes what ``m`` does. Explicit
  ``prediction=`` / ``num_train_timesteps=`` arguments still win.
- a ``UNet3DConditionModel`` (ModelScope text-to-video) becomes a space-time
  [`UNet`][diffkit.nn.unet.UNet] (``temporal`` set) taking ``(batch, frames, channels, h, w)``
  where diffusers takes ``(batch, channels, frames, h, w)``; see
  ``diffkit.interop._diffusers_video``.
- a ``WanTransformer3DModel`` (Wan 2.1) becomes a rotary-position
  [`VideoDiT`][diffkit.nn.video.VideoDiT]; see ``diffkit.interop._diffusers_wan_transformer``.
- a ``LatteTransformer3DModel`` becomes a [`VideoDiT`][diffkit.nn.video.VideoDiT] of
  alternating spatial and temporal PixArt blocks; see
  ``diffkit.interop._diffusers_transformer``.
- an ``AutoencoderKL`` becomes a [`KLAutoencoder`][diffkit.nn.vae.KLAutoencoder] whose
  ``encode(x)`` is ``(vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor`` and
  whose ``decode(z)`` is ``vae.decode(z / scaling_factor + shift_factor).sample``
  (``shift_factor`` is 0 unless the diffusers config sets it).
- an ``AutoencoderKLWan`` (Wan 2.1's video VAE) becomes a
  [`CausalVideoAutoencoder`][diffkit.nn.video_vae.CausalVideoAutoencoder] taking
  ``(batch, frames, channels, h, w)``; see ``diffkit.interop._diffusers_wan_vae``.

``to_diffusers_state_dict(module)`` is the inverse for the weights: it loads with
``strict=True`` into a diffusers model built with the matching config, and
``to_diffusers(module)`` builds that model (``UNet2DModel`` without cross-attention,
``UNet2DConditionModel`` with it, ``AutoencoderKL``) with the weights loaded. The exported
U-Net's ``forward(sample, timestep)`` takes ``timestep = network_timestep(t)``: the training
index ``N t - 1`` for ``time_input="index"``, else the float ``time_scale * t``. A diffusers
scheduler's integer timesteps ``i`` therefore mean ``t = (i + 1) / N`` for an index model, but
``t = i / time_scale`` for a continuous-time one: pass ``time_scale * t`` yourself there.

Only the common block types convert (``DownBlock2D`` / ``AttnDownBlock2D`` /
``CrossAttnDownBlock2D`` and their up counterparts, positional time embeddings, SiLU); any
other option raises ``ValueError`` naming it, rather than converting to a different network.
"""

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from diffkit.interop._diffusers_transformer import (
    LATTE_TRANSFORMERS,
    TRANSFORMERS,
    dit_config,
    dit_state_dict,
    latte_config,
    to_diffusers_latte,
    to_diffusers_transformer,
)
from diffkit.interop._diffusers_video import (
    VIDEO_UNETS,
    unet3d_config,
    unet3d_kwargs,
    video_keys_to_diffkit,
    video_keys_to_diffusers,
)
from diffkit.interop._diffusers_wan_transformer import (
    WAN_TRANSFORMERS,
    to_diffusers_wan,
    wan_config,
    wan_state_dict,
)
from diffkit.interop._diffusers_wan_vae import (
    VIDEO_AUTOENCODERS,
    from_wan_vae,
    wan_vae_diffusers_state_dict,
    wan_vae_kwargs,
    wan_vae_state_dict,
)
from diffkit.interop._schedulers import SCHEDULERS, SchedulerParts, scheduler_parts
from diffkit.nn.dit import DiT
from diffkit.nn.unet import UNet, UNetConfig
from diffkit.nn.vae import KLAutoencoder, KLAutoencoderConfig
from diffkit.nn.video import VideoDiT
from diffkit.nn.video_vae import CausalVideoAutoencoder
from diffkit.typing import Prediction

__all__ = ["from_diffusers", "to_diffusers", "to_diffusers_state_dict"]

# One table for both directions: (where, diffusers name, diffkit name), in the order the
# renames apply. ``where`` anchors a name in a dotted parameter key: "inner" between two
# dots, "part" after a dot or at the key's start, "start" at the key's start, "key" the key.
_NAMES: list[tuple[str, str, str]] = [
    ("part", "down_blocks", "down"),
    ("part", "up_blocks", "up"),
    ("part", "mid_block", "mid"),
    ("inner", "resnets", "res"),
    ("inner", "attentions", "attn"),
    ("inner", "downsamplers.0.conv", "downsample.conv"),
    ("inner", "upsamplers.0.conv", "upsample.conv"),
    ("inner", "time_emb_proj", "emb_proj"),
    ("inner", "conv_shortcut", "skip"),
    ("inner", "transformer_blocks", "blocks"),
    ("inner", "to_out.0", "out"),
    ("inner", "ff.net.0.proj", "ff.proj_in"),
    ("inner", "ff.net.2", "ff.proj_out"),
    ("part", "conv_norm_out", "norm_out"),
    ("start", "time_embedding.", "time_embed."),
    ("key", "class_embedding.weight", "label_embed.weight"),
    ("start", "class_embedding.linear_", "pooled_embed.linear_"),
    # SDXL's text_time embedding (back: _state_dict_to_diffusers's caller renames it)
    ("start", "add_embedding.linear_", "pooled_embed.linear_"),
]

_ANCHORS = {  # where -> (pattern around the escaped name, replacement around the new name)
    "inner": (r"\.{}\.", ".{}."),
    "part": (r"(^|\.){}\.", r"\1{}."),
    "start": (r"^{}", "{}"),
    "key": (r"^{}$", "{}"),
}


def _rules(to_diffkit: bool) -> list[tuple[str, str]]:
    """``_NAMES`` as ``re.sub`` rules from diffusers to diffkit, or back."""
    rules = []
    for where, diffusers_name, diffkit_name in _NAMES:
        old, new = (diffusers_name, diffkit_name) if to_diffkit else (diffkit_name, diffusers_name)
        pattern, replacement = _ANCHORS[where]
        rules.append((pattern.format(re.escape(old)), replacement.format(new)))
    return rules


# diffusers' pixel self-attention calls its GroupNorm ``group_norm``; back: _state_dict_to_diffusers
_TO_DIFFKIT = [*_rules(to_diffkit=True), (r"\.group_norm\.", ".norm.")]
_TO_DIFFUSERS = _rules(to_diffkit=False)

_PROJ = re.compile(r"^(.*)\.to_([qkv])\.(weight|bias)$")


def _rename(key: str, rules: Iterable[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _state_dict_to_diffkit(source: Mapping[str, Tensor], target: nn.Module) -> dict[str, Tensor]:
    """diffusers parameter names and layout -> diffkit's (fusing q, k, v projections)."""
    wanted = set(target.state_dict())
    out: dict[str, Tensor] = {}
    projections: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in source.items():
        name = _rename(key, _TO_DIFFKIT)
        match = _PROJ.match(name)
        if match is None:
            out[name] = value
            continue
        prefix, which, param = match.groups()
        projections.setdefault((prefix, param), {})[which] = value
    for (prefix, param), parts in projections.items():
        if f"{prefix}.qkv.{param}" in wanted:
            out[f"{prefix}.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            out[f"{prefix}.q.{param}"] = parts["q"]
            out[f"{prefix}.kv.{param}"] = torch.cat([parts["k"], parts["v"]])
    return out


def _state_dict_to_diffusers(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffkit parameter names and layout -> diffusers' (splitting fused projections)."""
    out: dict[str, Tensor] = {}
    for key, value in source.items():
        prefix, _, param = key.rpartition(".")
        owner, _, leaf = prefix.rpartition(".")
        if (
            leaf == "norm"
            and f"{owner}.qkv.weight" in source
            and f"{owner}.proj_in.weight" not in source
        ):
            key = f"{owner}.group_norm.{param}"  # pixel self-attention's GroupNorm
        if leaf in ("qkv", "kv", "q") and f"{owner}.out.weight" in source:
            names = {"qkv": "qkv", "kv": "kv", "q": "q"}[leaf]
            chunks = value.chunk(len(names))
            for letter, chunk in zip(names, chunks, strict=True):
                out[_rename(f"{owner}.to_{letter}.{param}", _TO_DIFFUSERS)] = chunk.clone()
            continue
        out[_rename(key, _TO_DIFFUSERS)] = value.clone()
    return out


def _config(module: nn.Module) -> Mapping[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        raise TypeError(f"{type(module).__name__} has no diffusers config")
    return config


def _uniform(value: Any, name: str) -> Any:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"from_diffusers: per-level {name}={tuple(value)} is not supported")
        return value[0]
    return value


def _require(config: Mapping[str, Any], name: str, allowed: Iterable[Any]) -> None:
    value = config.get(name)
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(
            f"from_diffusers: {name}={value!r} is not supported (supported: {allowed})"
        )


_DOWN = {"DownBlock2D": "none", "AttnDownBlock2D": "self", "CrossAttnDownBlock2D": "cross"}
_UP = {"UpBlock2D": "none", "AttnUpBlock2D": "self", "CrossAttnUpBlock2D": "cross"}


_RECORD = "_diffkit"  # diffkit-only U-Net settings to_diffusers stores in the diffusers config
_RECORDED = (
    "time_input",
    "time_scale",
    "num_train_timesteps",
    "prediction",
    "time_shift",  # SD3's transformer
    "micro_conditions",  # an SDXL U-Net's (base 6, refiner 5): not in diffusers' config
)


def _recorded(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The diffkit settings ``to_diffusers`` recorded in a diffusers config (empty if none)."""
    record = cfg.get(_RECORD)
    if record is None:
        return {}
    if not isinstance(record, Mapping) or not set(record) <= set(_RECORDED):
        raise ValueError(
            f"from_diffusers: config entry {_RECORD}={record!r} is not a mapping of {_RECORDED}"
        )
    return dict(cast(Mapping[str, Any], record))


def _check_conditional_options(cfg: Mapping[str, Any]) -> None:
    """Refuse the UNet2DConditionModel options diffkit's U-Net does not have."""
    _require(cfg, "addition_embed_type", [None, "text_time"])
    if cfg.get("addition_embed_type") == "text_time":
        _require(cfg, "class_embed_type", [None])
    for name in (
        "encoder_hid_dim_type",
        "time_cond_proj_dim",
        "time_embedding_act_fn",
        "timestep_post_act",
    ):
        _require(cfg, name, [None])
    for name in ("dual_cross_attention", "class_embeddings_concat", "resnet_skip_time_act"):
        _require(cfg, name, [False])
    _require(cfg, "only_cross_attention", [False, (False,) * len(cfg["down_block_types"])])
    _require(cfg, "mid_block_only_cross_attention", [None, False])
    _require(cfg, "conv_in_kernel", [3])
    _require(cfg, "conv_out_kernel", [3])
    _require(cfg, "attention_type", ["default"])
    _require(cfg, "resnet_out_scale_factor", [1.0])
    _require(cfg, "class_embed_type", [None, "projection"])
    if cfg.get("mid_block_type") == "UNetMidBlock2D":
        raise ValueError(
            "from_diffusers: mid_block_type='UNetMidBlock2D' is not supported in a "
            "UNet2DConditionModel (diffusers builds it with one resnet and no attention; "
            "diffkit's middle block has two resnets); use 'UNetMidBlock2DCrossAttn'"
        )
    _require(cfg, "mid_block_type", ["UNetMidBlock2DCrossAttn"])
    _require(cfg, "reverse_transformer_layers_per_block", [None])


def _check_unconditional_options(cfg: Mapping[str, Any]) -> None:
    """Refuse the UNet2DModel options diffkit's U-Net does not have."""
    _require(cfg, "class_embed_type", [None])
    _require(cfg, "downsample_type", ["conv"])
    _require(cfg, "upsample_type", ["conv"])
    _require(cfg, "mid_block_type", ["UNetMidBlock2D"])
    # diffusers' mid-block attention has no GroupNorm with scale_shift unless
    # attn_norm_num_groups is given; without that attention (add_attention=False) it is moot
    attn_groups = cfg.get("attn_norm_num_groups")
    if cfg.get("add_attention", True) and (
        attn_groups not in (None, cfg["norm_num_groups"])
        or (attn_groups is None and cfg["resnet_time_scale_shift"] != "default")
    ):
        raise ValueError(
            "from_diffusers: a mid-block attention GroupNorm other than norm_num_groups "
            "(attn_norm_num_groups) is not supported"
        )


def _check_options(cfg: Mapping[str, Any], conditional: bool) -> None:
    """Refuse any diffusers U-Net option that would convert to a different network."""
    _require(cfg, "act_fn", ["silu", "swish"])
    _require(cfg, "time_embedding_type", ["positional"])
    _require(cfg, "resnet_time_scale_shift", ["default", "scale_shift"])
    if conditional:
        _check_conditional_options(cfg)
    else:
        _check_unconditional_options(cfg)
    if cfg.get("norm_num_groups") is None:
        raise ValueError("from_diffusers: norm_num_groups=None is not supported")


def _level_kinds(cfg: Mapping[str, Any]) -> list[str]:
    """Each level's attention ("none", "self" or "cross"), the up blocks mirroring the down."""
    down_kinds = []
    for name in cfg["down_block_types"]:
        if name not in _DOWN:
            raise ValueError(f"from_diffusers: down block {name} is not supported ({list(_DOWN)})")
        down_kinds.append(_DOWN[name])
    up_kinds = []
    for name in reversed(cfg["up_block_types"]):
        if name not in _UP:
            raise ValueError(f"from_diffusers: up block {name} is not supported ({list(_UP)})")
        up_kinds.append(_UP[name])
    if down_kinds != up_kinds:
        raise ValueError(
            "from_diffusers: the up blocks must mirror the down blocks, got "
            f"{cfg['down_block_types']} / {cfg['up_block_types']}"
        )
    return down_kinds


def _attention_kind(mid_block: Any, level_kinds: list[str]) -> tuple[str | None, bool]:
    """The one attention kind of the network ("self", "cross" or None) and mid_attention."""
    mid_cross = type(mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    kinds = {k for k in level_kinds if k != "none"} | ({"cross"} if mid_cross else set())
    mid_attention = bool(mid_cross or getattr(mid_block, "add_attention", True))
    if not mid_cross and mid_attention:
        kinds.add("self")
    if len(kinds) > 1:
        raise ValueError("from_diffusers: mixing self-attention and cross-attention blocks")
    return (kinds.pop() if kinds else None), mid_attention


def _heads(module: nn.Module) -> tuple[int, int | None]:
    """``(attention_head_dim, num_heads)``, read off the attention modules themselves.

    diffusers' ``attention_head_dim`` means different things in different models.
    """
    heads: list[tuple[int, int]] = []
    for block in [*cast(nn.ModuleList, module.down_blocks), module.mid_block]:
        for attn in getattr(block, "attentions", []):
            if attn is None:
                continue
            if hasattr(attn, "transformer_blocks"):
                attn = attn.transformer_blocks[0].attn1
            heads.append((attn.heads, attn.inner_dim // attn.heads))
    head_dims = {d for _, d in heads}
    head_counts = {h for h, _ in heads}
    if len(head_dims) == 1:
        return head_dims.pop(), None
    if len(head_counts) == 1:
        return 32, head_counts.pop()
    if heads:
        raise ValueError(f"from_diffusers: per-level heads {heads} are not supported")
    return 32, None


def _embeddings(
    module: nn.Module, cfg: Mapping[str, Any], micro_conditions: int
) -> tuple[int | None, int | None]:
    """``(num_classes, pooled_dim)``: a class-label table or a pooled-vector projection
    (SDXL's text_time: the pooled text beside ``micro_conditions`` sinusoids)."""
    if cfg.get("addition_embed_type") == "text_time":
        width = cfg["projection_class_embeddings_input_dim"]
        pooled = width - micro_conditions * cfg["addition_time_embed_dim"]
        if pooled <= 0:
            raise ValueError(
                f"from_diffusers: projection_class_embeddings_input_dim={width} leaves no pooled "
                f"text beside {micro_conditions} micro-conditions (micro_conditions=?)"
            )
        return None, pooled
    class_embedding = getattr(module, "class_embedding", None)
    if isinstance(class_embedding, nn.Embedding):
        return class_embedding.num_embeddings, None
    if class_embedding is not None:
        return None, cfg["projection_class_embeddings_input_dim"]
    return None, None


def _depths(cfg: Mapping[str, Any]) -> int | tuple[int, ...]:
    """Transformer blocks per attention: one number, or one per level."""
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, list | tuple):
        if any(isinstance(d, list | tuple) for d in depth):
            raise ValueError(
                f"from_diffusers: transformer_layers_per_block={depth!r} per block is not supported"
            )
        return depth[0] if len(set(depth)) == 1 else tuple(depth)
    return depth


def _unet_config(
    module: nn.Module,
    prediction: Prediction | None,
    num_train_timesteps: int | None,
    micro_conditions: int | None = None,
) -> UNetConfig:
    cfg = _config(module)
    record = _recorded(cfg)
    if micro_conditions is None:
        micro_conditions = int(record.get("micro_conditions") or 6)
    _check_options(cfg, conditional=type(module).__name__ == "UNet2DConditionModel")
    level_kinds = _level_kinds(cfg)
    attention, mid_attention = _attention_kind(module.mid_block, level_kinds)
    attention_head_dim, num_heads = _heads(module)
    num_classes, pooled_dim = _embeddings(module, cfg, micro_conditions)
    text_time = cfg.get("addition_embed_type") == "text_time"
    context_dim = None
    if attention == "cross":
        context_dim = _uniform(cfg["cross_attention_dim"], "cross_attention_dim")
    widths = list(cfg["block_out_channels"])
    base = math.gcd(*widths)
    n_train = (
        num_train_timesteps
        or record.get("num_train_timesteps")
        or cfg.get("num_train_timesteps")
        or 1000
    )
    return UNetConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        blocks_per_level=_uniform(cfg["layers_per_block"], "layers_per_block"),
        attention_resolutions=tuple(2**i for i, k in enumerate(level_kinds) if k != "none"),
        attention_head_dim=attention_head_dim,
        num_heads=num_heads,
        mid_attention=mid_attention,
        context_dim=context_dim,
        transformer_depth=_depths(cfg),
        micro_conditions=micro_conditions if text_time else 0,
        micro_freq_dim=cfg.get("addition_time_embed_dim") or 256,
        linear_projection=bool(cfg.get("use_linear_projection", False)),
        num_classes=num_classes,
        pooled_dim=pooled_dim,
        norm_groups=cfg["norm_num_groups"],
        norm_eps=cfg["norm_eps"],
        scale_shift=cfg["resnet_time_scale_shift"] == "scale_shift",
        dropout=cfg.get("dropout", 0.0),
        time_embed_dim=cfg.get("time_embedding_dim") or widths[0] * 4,
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=cfg["freq_shift"],
        mid_scale=cfg["mid_block_scale_factor"],
        downsample_padding=cfg["downsample_padding"],
        center_input=cfg["center_input_sample"],
        prediction=prediction or record.get("prediction", "epsilon"),
        time_input=record.get("time_input", "index"),
        time_scale=record.get("time_scale", 1000.0),
        num_train_timesteps=int(n_train),
    )


def _vae_config(module: nn.Module) -> KLAutoencoderConfig:
    cfg = _config(module)
    _require(cfg, "act_fn", ["silu", "swish"])
    for name in cfg["down_block_types"]:
        if name != "DownEncoderBlock2D":
            raise ValueError(f"from_diffusers: encoder block {name} is not supported")
    for name in cfg["up_block_types"]:
        if name != "UpDecoderBlock2D":
            raise ValueError(f"from_diffusers: decoder block {name} is not supported")
    if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
        raise ValueError("from_diffusers: per-channel latents_mean / latents_std not supported")
    widths = list(cfg["block_out_channels"])
    base = math.gcd(*widths)
    return KLAutoencoderConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        blocks_per_level=cfg["layers_per_block"],
        latent_channels=cfg["latent_channels"],
        norm_groups=cfg["norm_num_groups"],
        mid_attention=cfg.get("mid_block_add_attention", True),
        quant_conv=cfg.get("use_quant_conv", True),
        post_quant_conv=cfg.get("use_post_quant_conv", True),
        scaling_factor=cfg["scaling_factor"],
        shift_factor=cfg.get("shift_factor") or 0.0,
    )


def from_diffusers(
    module: Any,
    *,
    prediction: Prediction | None = None,
    num_train_timesteps: int | None = None,
    micro_conditions: int | None = None,
    time_shift: float | None = None,
) -> nn.Module | SchedulerParts:
    """A diffusers network or scheduler converted (the public
    [`from_diffusers`][diffkit.interop.from_diffusers], pipelines aside)."""
    name = type(module).__name__
    if name in SCHEDULERS:
        return scheduler_parts(module)
    converted: nn.Module
    keys: Callable[[dict[str, Tensor]], dict[str, Tensor]] = dict
    if name in ("UNet2DModel", "UNet2DConditionModel"):
        converted = UNet(_unet_config(module, prediction, num_train_timesteps, micro_conditions))
    elif name in VIDEO_UNETS:  # space-time U-Net: diffkit.interop._diffusers_video
        record = _recorded(_config(module))
        converted = UNet(unet3d_config(module, prediction, num_train_timesteps, record))
        keys = video_keys_to_diffkit
    elif name == "AutoencoderKL":
        converted = KLAutoencoder(_vae_config(module))
    elif name in VIDEO_AUTOENCODERS:  # causal 3-D VAE: diffkit.interop._diffusers_wan_vae
        converted = from_wan_vae(module)
    elif name in TRANSFORMERS:
        record = _recorded(_config(module))
        converted = DiT(dit_config(module, prediction, num_train_timesteps, record, time_shift))
    elif name in WAN_TRANSFORMERS:  # a VideoDiT: diffkit.interop._diffusers_wan_transformer
        record = _recorded(_config(module))
        converted = VideoDiT(wan_config(_config(module), prediction, record, time_shift))
    elif name in LATTE_TRANSFORMERS:  # a VideoDiT: diffkit.interop._diffusers_transformer
        record = _recorded(_config(module))
        cfg = _config(module)
        converted = VideoDiT(latte_config(cfg, prediction, num_train_timesteps, record, time_shift))
    else:
        raise TypeError(
            f"from_diffusers: cannot convert {name}; supported: UNet2DModel, "
            f"UNet2DConditionModel, {', '.join(VIDEO_UNETS)}, AutoencoderKL, "
            f"{', '.join(VIDEO_AUTOENCODERS)}, "
            f"{', '.join(TRANSFORMERS + WAN_TRANSFORMERS + LATTE_TRANSFORMERS)}, and the "
            f"schedulers {', '.join(SCHEDULERS)}"
        )
    return _load_converted(module, converted, keys)


def _load_converted(
    module: nn.Module,
    converted: nn.Module,
    keys: Callable[[dict[str, Tensor]], dict[str, Tensor]],
) -> nn.Module:
    """``converted`` with ``module``'s weights (renamed by ``keys``, then by the converted
    network's table), in ``module``'s dtype, device and training mode."""
    source = keys(module.state_dict())
    if isinstance(converted, VideoDiT) and converted.config.positions == "rotary":
        state = wan_state_dict(source, converted.config)
    elif isinstance(converted, DiT | VideoDiT):  # DiT, PixArt, SD3, Latte: link tables
        state = dit_state_dict(source, converted.config)
    elif isinstance(converted, CausalVideoAutoencoder):
        state = wan_vae_state_dict(source, converted)
    else:
        state = _state_dict_to_diffkit(source, converted)
    parameter = next(module.parameters(), None)
    if parameter is not None:  # before loading: float64 weights stay float64
        converted.to(device=parameter.device, dtype=parameter.dtype)
    converted.load_state_dict(state, strict=True)
    return converted.train(module.training)


def to_diffusers_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The weights of a diffkit ``UNet`` / ``KLAutoencoder`` / ``CausalVideoAutoencoder`` /
    ``DiT`` under diffusers' names and layout.

    Loads with ``strict=True`` into the diffusers model of the matching config.
    """
    if isinstance(module, DiT):
        return to_diffusers_transformer(module)[1]
    if isinstance(module, CausalVideoAutoencoder):
        return wan_vae_diffusers_state_dict(module)
    if isinstance(module, VideoDiT):
        return _video_transformer(module)[1]
    if not isinstance(module, UNet | KLAutoencoder):
        raise TypeError(
            f"to_diffusers_state_dict: cannot export {type(module).__name__}; "
            "supported: UNet, KLAutoencoder, CausalVideoAutoencoder, DiT, VideoDiT (Wan, Latte)"
        )
    state = _state_dict_to_diffusers(module.state_dict())
    if isinstance(module, UNet) and module.config.temporal is not None:
        return video_keys_to_diffusers(state)
    if isinstance(module, UNet) and module.config.micro_conditions:
        prefix = "class_embedding."  # SDXL's text_time embedding is add_embedding
        state = {
            ("add_embedding." + k[len(prefix) :] if k.startswith(prefix) else k): v
            for k, v in state.items()
        }
    return state


def _video_transformer(module: VideoDiT) -> tuple[Any, dict[str, Tensor]]:
    """A VideoDiT's diffusers model: Latte for alternating blocks, else Wan 2.1 (each refuses
    by name what it cannot express)."""
    if module.config.attention == "alternating":
        return to_diffusers_latte(module)
    return to_diffusers_wan(module)


def _block_types(attention: list[bool], kind: str) -> dict[str, tuple[str, ...]]:
    """diffusers' block names per level: ``{kind}DownBlock2D`` where the level attends."""
    return {
        "down_block_types": tuple(f"{kind}DownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple(
            f"{kind}UpBlock2D" if a else "UpBlock2D" for a in reversed(attention)
        ),
    }


def _unet2d_kwargs(c: UNetConfig, widths: list[int], attention: list[bool]) -> dict[str, Any]:
    """The ``UNet2DModel`` options of a U-Net with self-attention (or none)."""
    if c.pooled_dim is not None:
        raise ValueError("to_diffusers: UNet2DModel has no pooled-embedding conditioning")
    head_dims = {c.heads_at(w)[1] for w, a in zip(widths, attention, strict=True) if a}
    if c.mid_attention:
        head_dims.add(c.heads_at(widths[-1])[1])
    if c.num_heads not in (None, 1) and len(head_dims) > 1:
        raise ValueError("to_diffusers: UNet2DModel needs one attention head size")
    head_dim = None if c.num_heads == 1 else (head_dims.pop() if head_dims else None)
    return {
        **_block_types(attention, "Attn"),
        "attention_head_dim": head_dim,
        "attn_norm_num_groups": c.norm_groups,
        "add_attention": c.mid_attention,
    }


def _unet2d_condition_kwargs(
    c: UNetConfig, widths: list[int], attention: list[bool]
) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` options of a U-Net with cross-attention."""
    if not c.mid_attention:
        raise ValueError("to_diffusers: UNet2DConditionModel's middle block has cross-attention")
    extra: dict[str, Any] = {}
    if c.micro_conditions:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": c.micro_freq_dim,
            "projection_class_embeddings_input_dim": (c.pooled_dim or 0)
            + c.micro_conditions * c.micro_freq_dim,
        }
    elif c.pooled_dim is not None:
        extra = {
            "class_embed_type": "projection",
            "projection_class_embeddings_input_dim": c.pooled_dim,
        }
    return {
        **extra,
        **_block_types(attention, "CrossAttn"),
        # diffusers' UNet2DConditionModel reads ``attention_head_dim`` as heads per level
        "attention_head_dim": tuple(
            c.heads_at(w)[0] if a or i == len(widths) - 1 else 1
            for i, (w, a) in enumerate(zip(widths, attention, strict=True))
        ),
        "cross_attention_dim": c.context_dim,
        "transformer_layers_per_block": c.transformer_depth,
        "use_linear_projection": c.linear_projection,
    }


def _diffusers_unet_kwargs(config: UNetConfig) -> tuple[str, dict[str, Any]]:
    c = config
    if c.temporal is not None:  # a space-time U-Net
        return VIDEO_UNETS[0], unet3d_kwargs(c)
    widths = [c.base_channels * m for m in c.channel_mult]
    attention = [2**i in c.attention_resolutions for i in range(len(widths))]
    common: dict[str, Any] = {
        "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels,
        "center_input_sample": c.center_input,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": c.freq_shift,
        "block_out_channels": tuple(widths),
        "layers_per_block": c.blocks_per_level,
        "downsample_padding": c.downsample_padding,
        "mid_block_scale_factor": c.mid_scale,
        "dropout": c.dropout,
        "act_fn": "silu",
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if c.scale_shift else "default",
        "time_embedding_dim": c.time_embed_dim or 4 * widths[0],
        "num_class_embeds": c.num_classes,
    }
    if c.context_dim is None:
        return "UNet2DModel", {**common, **_unet2d_kwargs(c, widths, attention)}
    return "UNet2DConditionModel", {**common, **_unet2d_condition_kwargs(c, widths, attention)}


def _diffusers_vae_kwargs(config: KLAutoencoderConfig) -> dict[str, Any]:
    c = config
    levels = len(c.channel_mult)
    return {
        "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(c.base_channels * m for m in c.channel_mult),
        "layers_per_block": c.blocks_per_level,
        "latent_channels": c.latent_channels,
        "norm_num_groups": c.norm_groups,
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor or None,
        "use_quant_conv": c.quant_conv,
        "use_post_quant_conv": c.post_quant_conv,
        "mid_block_add_attention": c.mid_attention,
    }


def to_diffusers(module: nn.Module) -> nn.Module:
    """The diffusers model (config and weights) equivalent to a diffkit UNet / KLAutoencoder /
    DiT (a ``UNet3DConditionModel`` for a space-time U-Net, a ``DiTTransformer2DModel`` for
    adaLN-Zero, a ``PixArtTransformer2DModel`` for adaLN-single; a DiT built in diffkit's own
    position layout is refused by name).

    A U-Net then takes ``timestep = network_timestep(t)``: the training index ``N t - 1`` for
    ``time_input="index"``, or ``time_scale * t``; its config's ``_diffkit`` entry records
    ``time_input``, ``time_scale``, ``num_train_timesteps`` and ``prediction`` for
    ``from_diffusers``.
    """
    import diffusers

    if isinstance(module, DiT):
        model, state = to_diffusers_transformer(module)
    elif isinstance(module, CausalVideoAutoencoder):
        model = diffusers.AutoencoderKLWan(**wan_vae_kwargs(module.config))
        state = wan_vae_diffusers_state_dict(module)
    elif isinstance(module, VideoDiT):
        model, state = _video_transformer(module)
    else:
        if isinstance(module, UNet):
            name, kwargs = _diffusers_unet_kwargs(module.config)
        elif isinstance(module, KLAutoencoder):
            name, kwargs = "AutoencoderKL", _diffusers_vae_kwargs(module.config)
        else:
            raise TypeError(
                f"to_diffusers: cannot export {type(module).__name__}; "
                "supported: UNet, KLAutoencoder, CausalVideoAutoencoder, DiT, VideoDiT (Wan, Latte)"
            )
        model, state = getattr(diffusers, name)(**kwargs), to_diffusers_state_dict(module)
    if isinstance(module, UNet | DiT | VideoDiT):
        c = module.config
        fields = type(c).model_fields
        model.register_to_config(**{_RECORD: {k: getattr(c, k) for k in _RECORDED if k in fields}})
    parameter = next(module.parameters(), None)
    reference = next(model.parameters(), None)
    if (
        parameter is not None
        and reference is not None
        and (parameter.device, parameter.dtype) != (reference.device, reference.dtype)
    ):
        # torch's own cast: diffusers' ModelMixin.to logs a "should be kept in float32"
        # warning on any dtype argument, moot for a freshly built model with one dtype.
        # Before loading, so float64 weights stay float64.
        nn.Module.to(model, device=parameter.device, dtype=parameter.dtype)
    model.load_state_dict(state, strict=True)
    return model.train(module.training)
