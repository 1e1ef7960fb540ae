"""diffusers' patch transformers (DiT, PixArt-α/Σ, SD3) <-> diffkit's [`DiT`][diffkit.nn.dit.DiT].

Both are configurations of diffkit's patch-transformer core:

- ``DiTTransformer2DModel``: adaLN-Zero, class labels (``num_embeds_ada_norm`` classes plus
  the null class of classifier-free guidance, the table's last row), the timestep sinusoid
  with ``freq_shift=1``, ``learned_sigma`` when ``out_channels == 2 * in_channels``.
  diffusers gives every block its own copy of the time and label embeddings: where the
  copies are equal (the published checkpoints) the converted DiT keeps one, otherwise (a
  model trained in diffusers) each block keeps its own (``embeddings_per_block``).
- ``PixArtTransformer2DModel``: adaLN-single (``modulation="single"``), cross-attention to the
  caption tokens without a LayerNorm, the caption projection (``context_projection``), and
  PixArt-α's micro-conditions (``size_conditions``: ``Conditioning.micro`` is diffusers'
  ``added_cond_kwargs`` ``(resolution height, width, aspect_ratio)``).
- ``SD3Transformer2DModel``: MMDiT blocks (``joint_attention``): the caption tokens are a
  second stream, embedded by ``context_embedder``, with their own adaLN-Zero, projections and
  MLP; the last block only reads them. The pooled text (``pooled_projections``) is embedded
  beside the time; positions are the centre crop of a ``pos_embed_max_size`` grid
  (``pos_max_size``); ``qk_norm="rms_norm"`` and ``dual_attention_layers`` (SD3.5) are
  honoured. The network embeds ``1000 sigma`` of a shifted rectified flow: pass the
  scheduler's ``shift`` as ``time_shift`` so that ``t`` is that of
  [`RectifiedFlow`][diffkit.schedules.RectifiedFlow] with the same shift.

The weights map one to one through ``_links``: one table read in both directions.
"""

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from diffkit.nn.dit import DiT, DiTConfig, dit_positions
from diffkit.typing import Prediction

__all__ = [
    "TRANSFORMERS",
    "dit_config",
    "dit_state_dict",
    "sd3_config",
    "to_diffusers_transformer",
]

TRANSFORMERS = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel")

# A link: (diffkit key, diffusers keys, how). "same": one tensor; "cat": the diffusers tensors
# concatenated (fused q/k/v); "conv": a patch convolution as a linear map; "head": output
# rows in diffusers' (p q c) patch order, diffkit's (c p q); "tied": one diffkit tensor that
# diffusers copies into every block; "swap": the two halves of the rows exchanged (diffusers'
# AdaLayerNormContinuous regresses (scale, shift), diffkit (shift, scale)).
Link = tuple[str, tuple[str, ...], str]


def _require(cfg: Mapping[str, Any], name: str, allowed: list[Any]) -> None:
    if cfg.get(name) not in allowed:
        raise ValueError(
            f"from_diffusers: {name}={cfg.get(name)!r} is not supported (supported: {allowed})"
        )


def _check_options(name: str, cfg: Mapping[str, Any]) -> None:
    """Refuse, by name, every option diffkit's DiT would not honour."""
    _require(cfg, "norm_type", ["ada_norm_zero" if name.startswith("DiT") else "ada_norm_single"])
    _require(cfg, "activation_fn", ["gelu-approximate"])
    _require(cfg, "attention_bias", [True])
    _require(cfg, "norm_elementwise_affine", [False])
    _require(cfg, "dropout", [0.0])
    if name.startswith("PixArt"):
        _require(cfg, "attention_type", ["default", None])
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        if cfg.get("caption_channels") is not None and cfg.get("cross_attention_dim") != dim:
            raise ValueError(
                f"from_diffusers: cross_attention_dim={cfg.get('cross_attention_dim')!r} with "
                f"caption_channels: the caption projection gives the width {dim}"
            )


def _tied(module: Any) -> bool:
    """Whether every block of a diffusers DiT holds the same time and label embedding (on the
    meta device, with nothing to compare: no)."""
    first = module.transformer_blocks[0].norm1.emb.state_dict()
    if any(v.is_meta for v in first.values()):
        return False
    return all(
        all(torch.equal(v, block.norm1.emb.state_dict()[k]) for k, v in first.items())
        for block in module.transformer_blocks[1:]
    )


_SD3_QK_NORMS = {None: False, "rms_norm": True}


def sd3_config(
    cfg: Mapping[str, Any], prediction: Prediction | None, record: dict, time_shift: float | None
) -> DiTConfig:
    """The [`DiTConfig`][diffkit.nn.dit.DiTConfig] of a diffusers ``SD3Transformer2DModel``."""
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    _require(cfg, "caption_projection_dim", [dim])
    _require(cfg, "qk_norm", list(_SD3_QK_NORMS))
    return DiTConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg.get("out_channels") or cfg["in_channels"],
        dim=dim,
        depth=cfg["num_layers"],
        num_heads=cfg["num_attention_heads"],
        patch_size=cfg["patch_size"],
        freq_dim=256,
        pos_order="wh",
        pos_base_size=cfg["sample_size"] // cfg["patch_size"],
        pos_max_size=cfg.get("pos_embed_max_size"),
        context_dim=cfg["joint_attention_dim"],
        pooled_dim=cfg["pooled_projection_dim"],
        joint_attention=True,
        qk_norm=_SD3_QK_NORMS[cfg.get("qk_norm")],
        dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
        prediction=prediction or record.get("prediction", "flow"),
        time_input=record.get("time_input", "t"),
        time_scale=record.get("time_scale", 1000.0),
        num_train_timesteps=record.get("num_train_timesteps", 1000),
        time_shift=time_shift or record.get("time_shift", 1.0),
    )


def dit_config(
    module: Any,
    prediction: Prediction | None,
    num_train_timesteps: int | None,
    record: dict,
    time_shift: float | None = None,
) -> DiTConfig:
    """The [`DiTConfig`][diffkit.nn.dit.DiTConfig] of a diffusers DiT / PixArt / SD3 transformer."""
    name = type(module).__name__
    cfg = module.config
    if name == "SD3Transformer2DModel":
        return sd3_config(cfg, prediction, record, time_shift)
    _check_options(name, cfg)
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    out = cfg.get("out_channels") or cfg["in_channels"]
    learned_sigma = out == 2 * cfg["in_channels"]
    common: dict[str, Any] = {
        "in_channels": cfg["in_channels"],
        "out_channels": out // 2 if learned_sigma else out,
        "learned_sigma": learned_sigma,
        "dim": dim,
        "depth": cfg["num_layers"],
        "num_heads": cfg["num_attention_heads"],
        "patch_size": cfg["patch_size"],
        "freq_dim": 256,
        "pos_order": "wh",
        "pos_base_size": cfg["sample_size"] // cfg["patch_size"],
        "prediction": prediction or record.get("prediction", "epsilon"),
        "time_input": record.get("time_input", "index"),
        "time_scale": record.get("time_scale", 1000.0),
        "num_train_timesteps": num_train_timesteps or record.get("num_train_timesteps", 1000),
    }
    if name.startswith("DiT"):
        table = module.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        return DiTConfig(
            **common,
            num_classes=table.num_embeddings,
            freq_shift=1.0,
            mlp_norm_eps=cfg["norm_eps"],
            embeddings_per_block=not _tied(module),
        )
    caption = cfg.get("caption_channels")
    scale = cfg.get("interpolation_scale") or max(cfg["sample_size"] // 64, 1)
    return DiTConfig(
        **common,
        modulation="single",
        context_dim=caption if caption is not None else cfg.get("cross_attention_dim"),
        context_projection=caption is not None,
        cross_norm=False,
        norm_eps=cfg["norm_eps"],
        mlp_norm_eps=cfg["norm_eps"],
        pos_interpolation_scale=float(scale),
        size_conditions=bool(module.use_additional_conditions),
    )


def _attention(dk: str, df: str, *, cross: bool) -> list[Link]:
    links: list[Link] = []
    for param in ("weight", "bias"):
        qkv = tuple(f"{df}.to_{x}.{param}" for x in "qkv")
        if cross:
            links += [(f"{dk}.q.{param}", qkv[:1], "same"), (f"{dk}.kv.{param}", qkv[1:], "cat")]
        else:
            links.append((f"{dk}.qkv.{param}", qkv, "cat"))
        links.append((f"{dk}.out.{param}", (f"{df}.to_out.0.{param}",), "same"))
    return links


def _pair(dk: str, df: str, how: str = "same") -> list[Link]:
    return [(f"{dk}.{p}", (f"{df}.{p}",), how) for p in ("weight", "bias")]


def _block(i: int, config: DiTConfig) -> list[Link]:
    dk, df = f"blocks.{i}", f"transformer_blocks.{i}"
    links = [
        *_attention(f"{dk}.attn", f"{df}.attn1", cross=False),
        *_pair(f"{dk}.mlp.proj_in", f"{df}.ff.net.0.proj"),
        *_pair(f"{dk}.mlp.proj_out", f"{df}.ff.net.2"),
    ]
    if config.context_dim is not None:
        links += _attention(f"{dk}.cross", f"{df}.attn2", cross=True)
    if config.modulation == "zero":
        return [*links, *_pair(f"{dk}.ada", f"{df}.norm1.linear")]
    return [*links, (f"{dk}.ada_table", (f"{df}.scale_shift_table",), "same")]


def _embeddings(config: DiTConfig) -> list[Link]:
    """DiT's time and label embeddings: each block's own, or one diffusers copies per block."""
    emb = [f"transformer_blocks.{i}.norm1.emb" for i in range(config.depth)]
    owners = ["", *(f"blocks.{i}." for i in range(1, config.depth))]
    links: list[Link] = []
    for layer in ("linear_1", "linear_2"):
        for p in ("weight", "bias"):
            keys = tuple(f"{e}.timestep_embedder.{layer}.{p}" for e in emb)
            if config.embeddings_per_block:
                links += [
                    (f"{o}time_embed.{layer}.{p}", (k,), "same") for o, k in zip(owners, keys)
                ]
            else:
                links.append((f"time_embed.{layer}.{p}", keys, "tied"))
    table = tuple(f"{e}.class_embedder.embedding_table.weight" for e in emb)
    if config.embeddings_per_block:
        return links + [(f"{o}label_embed.weight", (k,), "same") for o, k in zip(owners, table)]
    return [*links, ("label_embed.weight", table, "tied")]


def _qkv(dk: str, df: str, names: tuple[str, str, str]) -> list[Link]:
    return [(f"{dk}.{p}", tuple(f"{df}.{n}.{p}" for n in names), "cat") for p in ("weight", "bias")]


def _joint_block(i: int, config: DiTConfig) -> list[Link]:
    """One MMDiT block's links (SD3's ``JointTransformerBlock``)."""
    dk, df = f"blocks.{i}", f"transformer_blocks.{i}"
    last = i == config.depth - 1
    links = [
        *_pair(f"{dk}.ada", f"{df}.norm1.linear"),
        *_pair(f"{dk}.ada_context", f"{df}.norm1_context.linear", "swap" if last else "same"),
        *_qkv(f"{dk}.attn.qkv", f"{df}.attn", ("to_q", "to_k", "to_v")),
        *_qkv(f"{dk}.attn.qkv_context", f"{df}.attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
        *_pair(f"{dk}.attn.out", f"{df}.attn.to_out.0"),
        *_pair(f"{dk}.mlp.proj_in", f"{df}.ff.net.0.proj"),
        *_pair(f"{dk}.mlp.proj_out", f"{df}.ff.net.2"),
    ]
    if not last:
        links += _pair(f"{dk}.attn.out_context", f"{df}.attn.to_add_out")
        links += _pair(f"{dk}.mlp_context.proj_in", f"{df}.ff_context.net.0.proj")
        links += _pair(f"{dk}.mlp_context.proj_out", f"{df}.ff_context.net.2")
    if config.qk_norm:
        names = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
        links += [
            (f"{dk}.attn.norms.{j}.weight", (f"{df}.attn.{n}.weight",), "same")
            for j, n in enumerate(names)
        ]
    if i in config.dual_attention_layers:
        links += _qkv(f"{dk}.attn2.qkv", f"{df}.attn2", ("to_q", "to_k", "to_v"))
        links += _pair(f"{dk}.attn2.out", f"{df}.attn2.to_out.0")
        if config.qk_norm:
            links += [
                (f"{dk}.attn2.{n}_norm.weight", (f"{df}.attn2.norm_{n}.weight",), "same")
                for n in "qk"
            ]
    return links


def _joint_links(config: DiTConfig) -> list[Link]:
    """Every diffkit parameter of an SD3 configuration and its diffusers source."""
    links = [
        *_pair("embed", "pos_embed.proj", "conv"),
        *_pair("time_embed.linear_1", "time_text_embed.timestep_embedder.linear_1"),
        *_pair("time_embed.linear_2", "time_text_embed.timestep_embedder.linear_2"),
        *_pair("pooled_embed.linear_1", "time_text_embed.text_embedder.linear_1"),
        *_pair("pooled_embed.linear_2", "time_text_embed.text_embedder.linear_2"),
        *_pair("context_embed", "context_embedder"),
    ]
    for i in range(config.depth):
        links += _joint_block(i, config)
    return [*links, *_pair("ada_out", "norm_out.linear", "swap"),
            *_pair("proj_out", "proj_out", "head")]  # fmt: skip


def _links(config: DiTConfig) -> list[Link]:
    """Every diffkit parameter of a DiT / PixArt / SD3 configuration and its diffusers source."""
    if config.joint_attention:
        return _joint_links(config)
    links = [*_pair("embed", "pos_embed.proj", "conv")]
    for i in range(config.depth):
        links += _block(i, config)
    if config.modulation == "zero":
        return [*links, *_embeddings(config), *_pair("ada_out", "proj_out_1"),
                *_pair("proj_out", "proj_out_2", "head")]  # fmt: skip
    links += _pair("time_embed.linear_1", "adaln_single.emb.timestep_embedder.linear_1")
    links += _pair("time_embed.linear_2", "adaln_single.emb.timestep_embedder.linear_2")
    links += _pair("ada", "adaln_single.linear")
    if config.size_conditions:
        for dk, df in (("resolution_embed", "resolution"), ("aspect_embed", "aspect_ratio")):
            for layer in ("linear_1", "linear_2"):
                links += _pair(f"{dk}.{layer}", f"adaln_single.emb.{df}_embedder.{layer}")
    if config.context_projection:
        links += _pair("context_embed.linear_1", "caption_projection.linear_1")
        links += _pair("context_embed.linear_2", "caption_projection.linear_2")
    links.append(("ada_out_table", ("scale_shift_table",), "same"))
    return [*links, *_pair("proj_out", "proj_out", "head")]


def _head(value: Tensor, config: DiTConfig, *, to_diffkit: bool) -> Tensor:
    p = config.patch_size
    pattern = "(p q c) ... -> (c p q) ..." if to_diffkit else "(c p q) ... -> (p q c) ..."
    return rearrange(value, pattern, p=p, q=p)


_POSITIONS = "pos_embed.pos_embed"  # SD3's stored positions: derived from the config


def _positions(config: DiTConfig) -> Tensor:
    """SD3's stored position table: the positions of the whole ``pos_max_size`` grid."""
    size = config.pos_max_size or 1
    return dit_positions(size, size, config).unsqueeze(0)


def _check_positions(source: Mapping[str, Tensor], config: DiTConfig) -> None:
    """SD3 stores its sin-cos positions; they must be the ones the config computes."""
    stored = source.get(_POSITIONS)
    if stored is None or stored.is_meta:
        return
    want = _positions(config).to(stored.device)
    if stored.shape != want.shape or not torch.allclose(stored.float(), want, atol=1e-6):
        raise ValueError(
            f"from_diffusers: {_POSITIONS} is not the sin-cos table of pos_embed_max_size "
            f"{config.pos_max_size}; diffkit computes the positions"
        )


def _swap(value: Tensor) -> Tensor:
    first, second = value.chunk(2)
    return torch.cat([second, first])


def dit_state_dict(source: Mapping[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """A diffusers DiT / PixArt / SD3 state dict under diffkit's names and layout."""
    if config.pos_max_size is not None:
        _check_positions(source, config)
    out: dict[str, Tensor] = {}
    for dk, df, how in _links(config):
        if how == "cat":
            out[dk] = torch.cat([source[k] for k in df])
            continue
        value = source[df[0]]
        if how == "tied" and not value.is_meta:  # meta: shapes only, nothing to compare
            for other in df[1:]:
                if not torch.equal(source[other], value):
                    raise ValueError(
                        f"from_diffusers: {other} differs from {df[0]}; diffkit's DiT has one "
                        "time and label embedding (the published checkpoints copy it per block)"
                    )
        elif how == "conv":
            value = value.flatten(1) if value.ndim > 1 else value
        elif how == "head":
            value = _head(value, config, to_diffkit=True)
        elif how == "swap":
            value = _swap(value)
        out[dk] = value
    return out


def diffusers_state_dict(source: Mapping[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """A diffkit DiT's state dict under diffusers' names and layout (the inverse)."""
    out: dict[str, Tensor] = {}
    for dk, df, how in _links(config):
        value = source[dk]
        if how == "cat":
            for key, chunk in zip(df, value.chunk(len(df)), strict=True):
                out[key] = chunk.clone()
            continue
        if how == "conv" and value.ndim > 1:
            p = config.patch_size
            value = rearrange(value, "d (c p q) -> d c p q", p=p, q=p)
        elif how == "head":
            value = _head(value, config, to_diffkit=False)
        elif how == "swap":
            value = _swap(value)
        for key in df if how == "tied" else df[:1]:
            out[key] = value.clone()
    if config.pos_max_size is not None:
        like, size = source["embed.weight"], config.pos_max_size
        out[_POSITIONS] = (
            torch.empty(1, size * size, config.dim, device="meta")
            if like.is_meta
            else _positions(config).to(like.device)
        )
    return out


def _sd3_kwargs(c: DiTConfig) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` options of a joint-attention DiT, refusing the rest."""
    problems = [
        f"{name}={value!r}"
        for name, value, wanted in (
            ("pos_order", c.pos_order, "wh"),
            ("pos_base_size", c.pos_base_size is None, False),
            ("pos_interpolation_scale", c.pos_interpolation_scale, 1.0),
            ("freq_dim", c.freq_dim, 256),
            ("freq_shift", c.freq_shift, 0.0),
            ("num_classes", c.num_classes, None),
            ("pooled_dim", c.pooled_dim is None, False),
            ("norm_eps", c.norm_eps, 1e-6),
            ("mlp_norm_eps", c.mlp_norm_eps, 1e-6),
        )
        if value != wanted
    ]
    if problems:
        raise ValueError(
            f"to_diffusers: SD3Transformer2DModel cannot express {', '.join(problems)}"
        )
    return {
        "sample_size": (c.pos_base_size or 1) * c.patch_size,
        "patch_size": c.patch_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels,
        "num_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "attention_head_dim": c.dim // c.num_heads,
        "joint_attention_dim": c.context_dim,
        "caption_projection_dim": c.dim,
        "pooled_projection_dim": c.pooled_dim,
        "pos_embed_max_size": c.pos_max_size,
        "dual_attention_layers": c.dual_attention_layers,
        "qk_norm": "rms_norm" if c.qk_norm else None,
    }


def _diffusers_kwargs(c: DiTConfig) -> tuple[str, dict[str, Any]]:
    """The diffusers class and options of a diffkit DiT, refusing what it cannot express."""
    if c.joint_attention:
        return "SD3Transformer2DModel", _sd3_kwargs(c)
    base = c.pos_base_size
    problems = [
        f"{name}={value!r}"
        for name, value, wanted in (
            ("pos_order", c.pos_order, "wh"),
            ("pos_base_size", base is None, False),
            ("freq_dim", c.freq_dim, 256),
            ("mlp_ratio", c.mlp_ratio, 4.0),
            ("pooled_dim", c.pooled_dim, None),
            ("pos_max_size", c.pos_max_size, None),
        )
        if value != wanted
    ]
    out = (c.out_channels or c.in_channels) * (2 if c.learned_sigma else 1)
    common: dict[str, Any] = {
        "num_attention_heads": c.num_heads,
        "attention_head_dim": c.dim // c.num_heads,
        "in_channels": c.in_channels,
        "out_channels": out,
        "num_layers": c.depth,
        "sample_size": (base or 1) * c.patch_size,
        "patch_size": c.patch_size,
    }
    if c.modulation == "zero":
        for name, value, wanted in (
            ("num_classes", c.num_classes is None, False),
            ("context_dim", c.context_dim, None),
            ("freq_shift", c.freq_shift, 1.0),
            ("norm_eps", c.norm_eps, 1e-6),
            ("pos_interpolation_scale", c.pos_interpolation_scale, 1.0),
            ("size_conditions", c.size_conditions, False),
        ):
            if value != wanted:
                problems.append(f"{name}={value!r}")
        name = "DiTTransformer2DModel"
        kwargs = {**common, "num_embeds_ada_norm": (c.num_classes or 2) - 1}
        kwargs["norm_eps"] = c.mlp_norm_eps
    else:
        for field, value, wanted in (
            ("num_classes", c.num_classes, None),
            ("cross_norm", c.cross_norm, False),
            ("freq_shift", c.freq_shift, 0.0),
            ("mlp_norm_eps", c.mlp_norm_eps, c.norm_eps),
        ):
            if value != wanted:
                problems.append(f"{field}={value!r}")
        name = "PixArtTransformer2DModel"
        kwargs = {
            **common,
            "cross_attention_dim": c.dim if c.context_projection else c.context_dim,
            "caption_channels": c.context_dim if c.context_projection else None,
            "norm_eps": c.norm_eps,
            "interpolation_scale": c.pos_interpolation_scale,
            "use_additional_conditions": c.size_conditions,
        }
    if problems:
        raise ValueError(f"to_diffusers: {name} cannot express {', '.join(problems)}")
    return name, kwargs


def to_diffusers_transformer(module: DiT) -> tuple[Any, dict[str, Tensor]]:
    """The diffusers DiT / PixArt model (built, not loaded) and the weights to load into it."""
    import diffusers

    name, kwargs = _diffusers_kwargs(module.config)
    model = getattr(diffusers, name)(**kwargs)
    return model, diffusers_state_dict(module.state_dict(), module.config)
