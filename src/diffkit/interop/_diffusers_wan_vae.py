"""diffusers' ``AutoencoderKLWan`` (the Wan 2.1 video VAE) <-> diffkit's
[`CausalVideoAutoencoder`][diffkit.nn.video_vae.CausalVideoAutoencoder].

The converted autoencoder takes videos ``(batch, frames, channels, h, w)`` where diffusers
takes ``(batch, channels, frames, h, w)``; its ``posterior(x).mean`` is
``vae.encode(x).latent_dist.mean`` and its decode of unnormalised latents is
``vae.decode(z).sample`` (both clamp to [-1, 1]). ``latents_mean`` / ``latents_std`` become the
config's per-channel normalisation (what Wan's pipelines apply around the VAE), so
``encode(x) = (mean - latents_mean) / latents_std``. diffusers codes the clip in chunks with a
feature cache; diffkit codes it whole, with equal results. Wan 2.2's options
(``is_residual``, ``patch_size``), attention in the encoder's levels (``attn_scales``) and
compression ratios that disagree with the architecture are refused by name.
"""

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from diffkit.nn.video_vae import CausalVideoAutoencoder, CausalVideoAutoencoderConfig

__all__ = [
    "VIDEO_AUTOENCODERS",
    "wan_vae_config",
    "wan_vae_diffusers_state_dict",
    "wan_vae_keys",
    "wan_vae_kwargs",
    "wan_vae_state_dict",
]

VIDEO_AUTOENCODERS = ("AutoencoderKLWan",)

_KNOWN = {
    "base_dim",
    "decoder_base_dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "attn_scales",
    "temperal_downsample",
    "dropout",
    "latents_mean",
    "latents_std",
    "is_residual",
    "in_channels",
    "out_channels",
    "patch_size",
    "scale_factor_temporal",
    "scale_factor_spatial",
}


def _refuse(name: str, value: Any, supported: Any) -> ValueError:
    return ValueError(
        f"AutoencoderKLWan: {name}={value!r} is not supported (supported: {supported})"
    )


def wan_vae_config(cfg: Mapping[str, Any]) -> CausalVideoAutoencoderConfig:
    """The diffkit config of an ``AutoencoderKLWan`` config; what it cannot honour is refused."""
    for name in cfg:
        if not name.startswith("_") and name not in _KNOWN:
            raise _refuse(name, cfg[name], "the Wan 2.1 options")
    for name, allowed in (("is_residual", (False,)), ("patch_size", (None, 1))):
        if cfg.get(name) not in allowed:
            raise _refuse(name, cfg.get(name), list(allowed))
    if cfg.get("attn_scales"):
        raise _refuse("attn_scales", cfg["attn_scales"], "[] (attention only in the middle)")
    mult = tuple(cfg["dim_mult"])
    levels = len(mult)
    temporal = tuple(bool(t) for t in cfg["temperal_downsample"])[: levels - 1]
    config = CausalVideoAutoencoderConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        base_channels=cfg["base_dim"],
        decoder_base_channels=cfg.get("decoder_base_dim"),
        channel_mult=mult,
        blocks_per_level=cfg["num_res_blocks"],
        temporal_downsample=temporal,
        latent_channels=cfg["z_dim"],
        dropout=cfg.get("dropout", 0.0),
        latents_mean=tuple(cfg["latents_mean"]) if cfg.get("latents_mean") is not None else None,
        latents_std=tuple(cfg["latents_std"]) if cfg.get("latents_std") is not None else None,
    )
    for name, value in (
        ("scale_factor_temporal", config.temporal_downsampling_factor),
        ("scale_factor_spatial", config.downsampling_factor),
    ):
        if cfg.get(name) not in (None, value):
            raise _refuse(name, cfg.get(name), f"{value} (what the architecture does)")
    return config


def wan_vae_kwargs(config: CausalVideoAutoencoderConfig) -> dict[str, Any]:
    """``AutoencoderKLWan(**kwargs)`` for a diffkit config; what it has not is refused."""
    c = config
    if c.scaling_factor != 1.0:
        raise ValueError(
            f"to_diffusers: AutoencoderKLWan has no scaling_factor (got {c.scaling_factor}); "
            "fold it into latents_std"
        )
    if not c.clamp_output:
        raise ValueError("to_diffusers: AutoencoderKLWan always clamps (clamp_output=False)")
    n = c.latent_channels
    return {
        "base_dim": c.base_channels,
        "decoder_base_dim": c.decoder_base_channels,
        "z_dim": n,
        "dim_mult": list(c.channel_mult),
        "num_res_blocks": c.blocks_per_level,
        "attn_scales": [],
        "temperal_downsample": list(c.temporal_downsample),
        "dropout": c.dropout,
        "latents_mean": list(c.latents_mean or [0.0] * n),
        "latents_std": list(c.latents_std or [1.0] * n),
        "is_residual": False,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels,
        "patch_size": None,
        "scale_factor_temporal": c.temporal_downsampling_factor,
        "scale_factor_spatial": c.downsampling_factor,
    }


_RES = (
    ("norm1.weight", "norm1.gamma"),
    ("conv1.weight", "conv1.weight"),
    ("conv1.bias", "conv1.bias"),
    ("norm2.weight", "norm2.gamma"),
    ("conv2.weight", "conv2.weight"),
    ("conv2.bias", "conv2.bias"),
    ("skip.weight", "conv_shortcut.weight"),
    ("skip.bias", "conv_shortcut.bias"),
)
_ATTN = (
    ("norm.weight", "norm.gamma"),
    ("attn.qkv.weight", "to_qkv.weight"),
    ("attn.qkv.bias", "to_qkv.bias"),
    ("attn.out.weight", "proj.weight"),
    ("attn.out.bias", "proj.bias"),
)
_CONV = (("weight", "weight"), ("bias", "bias"))
_NORM = (("weight", "gamma"),)


def _mid(dk: str, df: str) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    return [
        (f"{dk}.res.0", f"{df}.resnets.0", _RES),
        (f"{dk}.attn", f"{df}.attentions.0", _ATTN),
        (f"{dk}.res.1", f"{df}.resnets.1", _RES),
    ]


def _modules(c: CausalVideoAutoencoderConfig) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """(diffkit module, diffusers module, parameter names) for every module with weights."""
    levels, blocks = len(c.channel_mult), c.blocks_per_level
    out: list[tuple[str, str, tuple[tuple[str, str], ...]]] = [
        ("encoder.conv_in", "encoder.conv_in", _CONV),
        ("decoder.conv_in", "decoder.conv_in", _CONV),
        ("quant_conv", "quant_conv", _CONV),
        ("post_quant_conv", "post_quant_conv", _CONV),
    ]
    flat = 0  # diffusers' encoder lists resnets and resamplers in one down_blocks list
    for i in range(levels):
        for j in range(blocks):
            out.append((f"encoder.down.{i}.res.{j}", f"encoder.down_blocks.{flat}", _RES))
            flat += 1
        if i < levels - 1:
            df = f"encoder.down_blocks.{flat}"
            out.append((f"encoder.down.{i}.downsample.conv", f"{df}.resample.1", _CONV))
            out.append((f"encoder.down.{i}.temporal", f"{df}.time_conv", _CONV))
            flat += 1
        df = f"decoder.up_blocks.{i}"
        for j in range(blocks + 1):
            out.append((f"decoder.up.{i}.res.{j}", f"{df}.resnets.{j}", _RES))
        out.append((f"decoder.up.{i}.upsample.conv", f"{df}.upsamplers.0.resample.1", _CONV))
        out.append((f"decoder.up.{i}.temporal", f"{df}.upsamplers.0.time_conv", _CONV))
    for part in ("encoder", "decoder"):
        out += _mid(f"{part}.mid", f"{part}.mid_block")
        out.append((f"{part}.norm_out", f"{part}.norm_out", _NORM))
        out.append((f"{part}.conv_out", f"{part}.conv_out", _CONV))
    return out


def wan_vae_keys(module: CausalVideoAutoencoder) -> dict[str, str]:
    """diffkit parameter name -> ``AutoencoderKLWan`` parameter name, for every parameter."""
    names = set(module.state_dict())
    keys = {
        f"{dk}.{a}": f"{df}.{b}"
        for dk, df, params in _modules(module.config)
        for a, b in params
        if f"{dk}.{a}" in names
    }
    missing = names - set(keys)
    if missing:  # a layer this table does not know: a bug here, not the user's
        raise RuntimeError(f"AutoencoderKLWan: no diffusers name for {sorted(missing)}")
    return keys


def wan_vae_state_dict(
    source: Mapping[str, Tensor], module: CausalVideoAutoencoder
) -> dict[str, Tensor]:
    """An ``AutoencoderKLWan`` state dict under ``module``'s names and shapes (norm scales
    and 1x1 convolutions differ only in trailing unit dimensions)."""
    target = module.state_dict()
    return {dk: source[df].reshape(target[dk].shape) for dk, df in wan_vae_keys(module).items()}


def wan_vae_diffusers_state_dict(module: CausalVideoAutoencoder) -> dict[str, Tensor]:
    """The weights under ``AutoencoderKLWan``'s names and shapes (its RMS-norm scales and
    attention projections keep trailing unit dimensions)."""
    out: dict[str, Tensor] = {}
    state = module.state_dict()
    for dk, df in wan_vae_keys(module).items():
        value = state[dk]
        if df.endswith("gamma"):
            value = value.view(-1, 1, 1) if ".attentions." in df else value.view(-1, 1, 1, 1)
        elif df.endswith(("to_qkv.weight", "proj.weight")):
            value = value.view(*value.shape, 1, 1)
        out[df] = value
    return out


def from_wan_vae(module: nn.Module) -> CausalVideoAutoencoder:
    """The diffkit autoencoder of an ``AutoencoderKLWan`` (before its weights are loaded)."""
    config = getattr(module, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"{type(module).__name__} has no diffusers config")
    return CausalVideoAutoencoder(wan_vae_config(config))
