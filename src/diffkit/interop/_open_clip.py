"""open_clip ``CLIP`` (ViT image tower, transformer text tower) -> diffkit ``CLIP``."""

from typing import Any

import torch
from torch import Tensor, nn

from diffkit.nn.clip import (
    CLIP,
    MAX_LOGIT_SCALE,
    Activation,
    CLIPConfig,
    TextTowerConfig,
    VisionTowerConfig,
)

__all__ = ["from_open_clip"]


def _activation(block: Any, where: str) -> Activation:
    act = block.mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise NotImplementedError(f"from_open_clip: {where} uses the unsupported activation {act!r}")


def _check_block(block: Any, where: str) -> None:
    if type(block).__name__ != "ResidualAttentionBlock":
        raise NotImplementedError(
            f"from_open_clip: {where} uses {type(block).__name__}; only the default "
            "ResidualAttentionBlock (no qk-norm, scaled-cosine or head-scale options) is supported"
        )
    if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
        raise NotImplementedError(f"from_open_clip: {where} uses layer scale (ls_init_value)")
    if block.attn.in_proj_bias is None:
        raise NotImplementedError(f"from_open_clip: {where} has attention without biases")


def _blocks(resblocks: Any, prefix: str) -> tuple[dict[str, Tensor], Any]:
    """State-dict entries of diffkit blocks from open_clip's resblocks (and the first one)."""
    out: dict[str, Tensor] = {}
    for i, r in enumerate(resblocks):
        _check_block(r, f"{prefix} block {i}")
        p = f"{prefix}.blocks.{i}."
        out |= {
            p + "ln_1.weight": r.ln_1.weight,
            p + "ln_1.bias": r.ln_1.bias,
            p + "qkv.weight": r.attn.in_proj_weight,  # rows [q; k; v] like ours
            p + "qkv.bias": r.attn.in_proj_bias,
            p + "out.weight": r.attn.out_proj.weight,
            p + "out.bias": r.attn.out_proj.bias,
            p + "ln_2.weight": r.ln_2.weight,
            p + "ln_2.bias": r.ln_2.bias,
            p + "fc.weight": r.mlp.c_fc.weight,
            p + "fc.bias": r.mlp.c_fc.bias,
            p + "proj.weight": r.mlp.c_proj.weight,
            p + "proj.bias": r.mlp.c_proj.bias,
        }
    return out, resblocks[0] if len(resblocks) else None


def _projection(proj: Any, where: str) -> Tensor:
    """open_clip stores projections as ``x @ P`` matrices ``(width, out)``; ours are Linear."""
    if isinstance(proj, nn.Linear):
        if proj.bias is not None:
            raise NotImplementedError(f"from_open_clip: the {where} projection has a bias")
        return proj.weight
    if isinstance(proj, Tensor):
        return proj.T
    raise NotImplementedError(f"from_open_clip: the {where} tower has no projection")


def from_open_clip(model: nn.Module) -> CLIP:
    """A diffkit [`CLIP`][diffkit.nn.clip.CLIP] with the weights of an open_clip ``CLIP``.

    Supports open_clip's standard ViT + transformer models (OpenAI and LAION ViT-B/L/H
    style): learned or sin-cos positions, class-token pooling, GELU or QuickGELU, text
    pooled at the largest id (``argmax``) or at ``eos_id``. ``encode_image`` and
    ``encode_text`` of the result equal the original's (``normalize`` either way).
    """
    import open_clip
    from open_clip.transformer import VisionTransformer

    if not isinstance(model, open_clip.CLIP):
        raise TypeError(
            f"from_open_clip: expected an open_clip.CLIP, got {type(model).__name__} "
            "(CustomTextCLIP / CoCa / timm towers are not supported)"
        )
    m: Any = model
    visual: Any = m.visual
    if not isinstance(m.visual, VisionTransformer):
        raise NotImplementedError(
            f"from_open_clip: image tower {type(visual).__name__} is not supported (ViT only)"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise NotImplementedError(
            "from_open_clip: only class-token pooling with LayerNorm before pooling is supported"
        )
    if isinstance(visual.ln_pre, nn.Identity):
        raise NotImplementedError("from_open_clip: image towers without ln_pre are not supported")
    if visual.conv1.bias is not None:
        raise NotImplementedError("from_open_clip: patch embedding with a bias is not supported")
    if m.text_pool_type not in ("argmax", "eos"):
        raise NotImplementedError(
            f"from_open_clip: text pooling {m.text_pool_type!r} is not supported (only "
            "'argmax', at the largest id, or 'eos', at eos_id)"
        )
    if m.attn_mask is None:
        raise NotImplementedError(
            "from_open_clip: text towers without a causal mask (no_causal_mask=True) are "
            "not supported"
        )
    if getattr(m, "logit_bias", None) is not None:
        raise NotImplementedError("from_open_clip: SigLIP-style logit_bias is not supported")

    height, width = visual.image_size
    patch_h, patch_w = visual.patch_size
    if height != width or patch_h != patch_w:
        raise NotImplementedError("from_open_clip: only square images and patches are supported")

    vision_sd, v_block = _blocks(visual.transformer.resblocks, "vision")
    text_sd, t_block = _blocks(m.transformer.resblocks, "text")
    text_proj = _projection(m.text_projection, "text")
    vision_proj = _projection(visual.proj, "image")
    v_width = visual.conv1.out_channels
    t_width = m.token_embedding.embedding_dim

    text = TextTowerConfig(
        vocab_size=m.token_embedding.num_embeddings,
        context_length=m.positional_embedding.shape[0],
        width=t_width,
        layers=len(m.transformer.resblocks),
        heads=t_block.attn.num_heads if t_block is not None else 1,
        mlp_width=t_block.mlp.c_fc.out_features if t_block is not None else None,
        activation=_activation(t_block, "text") if t_block is not None else "gelu",
        layer_norm_eps=m.ln_final.eps,
        eos_token_id=None if m.text_pool_type == "argmax" else m.text_eos_id,
    )
    vision = VisionTowerConfig(
        image_size=height,
        patch_size=patch_h,
        channels=visual.conv1.in_channels,
        width=v_width,
        layers=len(visual.transformer.resblocks),
        heads=v_block.attn.num_heads if v_block is not None else 1,
        mlp_width=v_block.mlp.c_fc.out_features if v_block is not None else None,
        activation=_activation(v_block, "image") if v_block is not None else "gelu",
        layer_norm_eps=visual.ln_post.eps,
    )
    logit_scale = m.logit_scale.detach().reshape(())
    config = CLIPConfig(
        embed_dim=text_proj.shape[0],
        text=text,
        vision=vision,
        init_logit_scale=min(max(float(logit_scale), 0.0), MAX_LOGIT_SCALE),
    )
    state: dict[str, Tensor] = {
        "logit_scale": logit_scale,
        "text.token_embedding.weight": m.token_embedding.weight,
        "text.positional_embedding": m.positional_embedding,
        "text.ln_final.weight": m.ln_final.weight,
        "text.ln_final.bias": m.ln_final.bias,
        "text.projection.weight": text_proj,
        "vision.patch_embedding.weight": visual.conv1.weight.reshape(v_width, -1),
        "vision.class_embedding": visual.class_embedding,
        "vision.positional_embedding": visual.positional_embedding,
        "vision.ln_pre.weight": visual.ln_pre.weight,
        "vision.ln_pre.bias": visual.ln_pre.bias,
        "vision.ln_post.weight": visual.ln_post.weight,
        "vision.ln_post.bias": visual.ln_post.bias,
        "vision.projection.weight": vision_proj,
        **text_sd,
        **vision_sd,
    }
    dtype = m.token_embedding.weight.dtype
    device = m.token_embedding.weight.device
    out = CLIP(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        out.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return out.train(model.training)
