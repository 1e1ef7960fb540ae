"""diffusers' ``WanTransformer3DModel`` (Wan 2.1) <-> a [`VideoDiT`][diffkit.nn.video.VideoDiT].

Wan 2.1's denoiser is a configuration of diffkit's patch-transformer core:

- ``(pt, ph, pw)`` tubelets (``patch_embedding``, a ``Conv3d``), no added positions:
  3-D rotary positions in every self-attention (``positions="rotary"``, split over the
  frames, rows and columns of each head as ``WanRotaryPosEmbed`` does);
- queries and keys RMS-normalised across all heads (``qk_norm``, ``qk_norm_across_heads``)
  in the self- and cross-attentions;
- adaLN-single (``modulation="single"``): the time embedding ``c`` is regressed once to the
  six shifts, scales and gates (``condition_embedder.time_proj``), each block adds its
  ``scale_shift_table``; the output adds its table to ``c``;
- the T5 caption tokens go through PixArt's two-layer projection (``context_projection``)
  and are attended unmasked (``context_mask=False``: Wan pads them with zeros), after an
  affine LayerNorm when ``cross_attn_norm`` (``cross_norm``);
- an MLP of width ``ffn_dim`` (``mlp_dim``), a flow-matching (``"flow"``) prediction on
  ``timestep = 1000 t`` (pass the scheduler's ``flow_shift`` as ``time_shift``).

Image-to-video options (``image_dim``, ``added_kv_proj_dim``, ``pos_embed_seq_len``) are
refused by name. Videos are ``(b, f, c, h, w)`` in diffkit, ``(b, c, f, h, w)`` in diffusers.
The weights map through one link table read in both directions.
"""

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from diffkit.nn.video import VideoDiT, VideoDiTConfig
from diffkit.typing import Prediction

__all__ = ["WAN_TRANSFORMERS", "to_diffusers_wan", "wan_config", "wan_state_dict"]

WAN_TRANSFORMERS = ("WanTransformer3DModel",)

# (diffkit key, diffusers keys, how): "same"; "cat": fused q/k/v or k/v; "conv": the patch
# Conv3d as a linear map; "head": output rows in diffusers' (pt ph pw c) order, diffkit's
# (c pt ph pw); "table": diffusers' (1, n, dim) modulation table, diffkit's (n, dim).
Link = tuple[str, tuple[str, ...], str]


def _refuse(problems: list[str], where: str) -> None:
    if problems:
        raise ValueError(f"{where}: {', '.join(problems)} not supported")


def wan_config(
    cfg: Mapping[str, Any], prediction: Prediction | None, record: dict, time_shift: float | None
) -> VideoDiTConfig:
    """The [`VideoDiTConfig`][diffkit.nn.video.VideoDiTConfig] of a ``WanTransformer3DModel``."""
    wanted = {
        "image_dim": None,
        "added_kv_proj_dim": None,
        "pos_embed_seq_len": None,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
    }
    _refuse(
        [f"{k}={cfg.get(k, v)!r}" for k, v in wanted.items() if cfg.get(k, v) != v],
        "from_diffusers: WanTransformer3DModel with",
    )
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    return VideoDiTConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg.get("out_channels") or cfg["in_channels"],
        dim=heads * head_dim,
        depth=cfg["num_layers"],
        num_heads=heads,
        mlp_dim=cfg["ffn_dim"],
        patch_size=tuple(cfg["patch_size"]),
        attention="full",
        positions="rotary",
        rotary_max_len=cfg.get("rope_max_seq_len", 1024),
        freq_dim=cfg["freq_dim"],
        modulation="single",
        context_dim=cfg["text_dim"],
        context_projection=True,
        context_mask=False,
        cross_norm=bool(cfg.get("cross_attn_norm", True)),
        qk_norm=True,
        qk_norm_across_heads=True,
        prediction=prediction or record.get("prediction", "flow"),
        time_input=record.get("time_input", "t"),
        time_scale=record.get("time_scale", 1000.0),
        num_train_timesteps=record.get("num_train_timesteps", 1000),
        time_shift=time_shift or record.get("time_shift", 1.0),
    )


def _pair(dk: str, df: str, how: str = "same") -> list[Link]:
    return [(f"{dk}.{p}", (f"{df}.{p}",), how) for p in ("weight", "bias")]


def _attention(dk: str, df: str, *, cross: bool) -> list[Link]:
    links: list[Link] = []
    for p in ("weight", "bias"):
        if cross:
            links.append((f"{dk}.q.{p}", (f"{df}.to_q.{p}",), "same"))
            links.append((f"{dk}.kv.{p}", (f"{df}.to_k.{p}", f"{df}.to_v.{p}"), "cat"))
        else:
            links.append((f"{dk}.qkv.{p}", tuple(f"{df}.to_{x}.{p}" for x in "qkv"), "cat"))
    return [
        *links,
        *_pair(f"{dk}.out", f"{df}.to_out.0"),
        (f"{dk}.q_norm.weight", (f"{df}.norm_q.weight",), "same"),
        (f"{dk}.k_norm.weight", (f"{df}.norm_k.weight",), "same"),
    ]


def _links(config: VideoDiTConfig) -> list[Link]:
    """Every diffkit parameter of a Wan configuration and its diffusers source."""
    emb = "condition_embedder"
    links = [
        *_pair("embed", "patch_embedding", "conv"),
        *_pair("time_embed.linear_1", f"{emb}.time_embedder.linear_1"),
        *_pair("time_embed.linear_2", f"{emb}.time_embedder.linear_2"),
        *_pair("ada", f"{emb}.time_proj"),
        *_pair("context_embed.linear_1", f"{emb}.text_embedder.linear_1"),
        *_pair("context_embed.linear_2", f"{emb}.text_embedder.linear_2"),
    ]
    for i in range(config.depth):
        dk, df = f"blocks.{i}", f"blocks.{i}"
        links += _attention(f"{dk}.attn", f"{df}.attn1", cross=False)
        links += _attention(f"{dk}.cross", f"{df}.attn2", cross=True)
        if config.cross_norm:
            links += _pair(f"{dk}.norm_cross", f"{df}.norm2")
        links += _pair(f"{dk}.mlp.proj_in", f"{df}.ffn.net.0.proj")
        links += _pair(f"{dk}.mlp.proj_out", f"{df}.ffn.net.2")
        links.append((f"{dk}.ada_table", (f"{df}.scale_shift_table",), "table"))
    links.append(("ada_out_table", ("scale_shift_table",), "table"))
    return [*links, *_pair("proj_out", "proj_out", "head")]


def _head(value: Tensor, config: VideoDiTConfig, *, to_diffkit: bool) -> Tensor:
    pt, ph, pw = config.patch_size
    diffusers, diffkit = "(pt ph pw c) ...", "(c pt ph pw) ..."
    pattern = f"{diffusers} -> {diffkit}" if to_diffkit else f"{diffkit} -> {diffusers}"
    return rearrange(value, pattern, pt=pt, ph=ph, pw=pw)


def wan_state_dict(source: Mapping[str, Tensor], config: VideoDiTConfig) -> dict[str, Tensor]:
    """A diffusers ``WanTransformer3DModel`` state dict under diffkit's names and layout."""
    out: dict[str, Tensor] = {}
    for dk, df, how in _links(config):
        if how == "cat":
            out[dk] = torch.cat([source[k] for k in df])
            continue
        value = source[df[0]]
        if how == "conv" and value.ndim > 1:
            value = value.flatten(1)
        elif how == "head":
            value = _head(value, config, to_diffkit=True)
        elif how == "table":
            value = value.squeeze(0)
        out[dk] = value
    return out


def diffusers_wan_state_dict(
    source: Mapping[str, Tensor], config: VideoDiTConfig
) -> dict[str, Tensor]:
    """A Wan-configured [`VideoDiT`][diffkit.nn.video.VideoDiT]'s state dict under diffusers'
    names and layout (the inverse of ``wan_state_dict``)."""
    out: dict[str, Tensor] = {}
    pt, ph, pw = config.patch_size
    for dk, df, how in _links(config):
        value = source[dk]
        if how == "cat":
            for key, chunk in zip(df, value.chunk(len(df)), strict=True):
                out[key] = chunk.clone()
            continue
        if how == "conv" and value.ndim > 1:
            value = rearrange(value, "d (c pt ph pw) -> d c pt ph pw", pt=pt, ph=ph, pw=pw)
        elif how == "head":
            value = _head(value, config, to_diffkit=False)
        elif how == "table":
            value = value.unsqueeze(0)
        out[df[0]] = value.clone()
    return out


def _wan_kwargs(c: VideoDiTConfig) -> dict[str, Any]:
    """The ``WanTransformer3DModel`` options of a VideoDiT, refusing what it cannot express."""
    wanted: list[tuple[str, Any, Any]] = [
        ("attention", c.attention, "full"),
        ("positions", c.positions, "rotary"),
        ("rotary_theta", c.rotary_theta, 10000.0),
        ("modulation", c.modulation, "single"),
        ("context_dim", c.context_dim is None, False),
        ("context_projection", c.context_projection, True),
        ("context_mask", c.context_mask, False),
        ("qk_norm", c.qk_norm, True),
        ("qk_norm_across_heads", c.qk_norm_across_heads, True),
        ("local_mlp", c.local_mlp, False),
        ("learned_sigma", c.learned_sigma, False),
        ("num_classes", c.num_classes, None),
        ("pooled_dim", c.pooled_dim, None),
        ("size_conditions", c.size_conditions, False),
        ("embeddings_per_block", c.embeddings_per_block, False),
        ("joint_attention", c.joint_attention, False),
        ("freq_shift", c.freq_shift, 0.0),
        ("norm_eps", c.norm_eps, 1e-6),
        ("mlp_norm_eps", c.mlp_norm_eps, 1e-6),
        ("max_frames", c.max_frames, None),
    ]
    _refuse(
        [f"{name}={value!r}" for name, value, want in wanted if value != want],
        "to_diffusers: WanTransformer3DModel cannot express",
    )
    return {
        "patch_size": tuple(c.patch_size),
        "num_attention_heads": c.num_heads,
        "attention_head_dim": c.dim // c.num_heads,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels,
        "text_dim": c.context_dim,
        "freq_dim": c.freq_dim,
        "ffn_dim": c.mlp_dim or int(c.dim * c.mlp_ratio),
        "num_layers": c.depth,
        "cross_attn_norm": c.cross_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": c.rotary_max_len or 1024,
    }


def to_diffusers_wan(module: VideoDiT) -> tuple[Any, dict[str, Tensor]]:
    """The diffusers ``WanTransformer3DModel`` (built, not loaded) and the weights to load."""
    import diffusers

    kwargs = _wan_kwargs(module.config)
    model = diffusers.WanTransformer3DModel(**kwargs)
    return model, diffusers_wan_state_dict(module.state_dict(), module.config)
