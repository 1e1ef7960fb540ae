"""open_clip ``CLIP`` (ViT image tower, transformer text tower) -> diffkit ``CLIP``."""

from typing import Any

from torch import Tensor, nn

from diffkit.interop._clip import block_state, load_converted
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


def _blocks(resblocks: Any, prefix: str) -> dict[str, Tensor]:
    """State-dict entries of diffkit blocks from open_clip's resblocks."""
    out: dict[str, Tensor] = {}
    for i, r in enumerate(resblocks):
        _check_block(r, f"{prefix} block {i}")
        out |= block_state(
            f"{prefix}.blocks.{i}.",
            ln_1=r.ln_1,
            qkv=(r.attn.in_proj_weight, r.attn.in_proj_bias),  # rows [q; k; v] like ours
            out=r.attn.out_proj,
            ln_2=r.ln_2,
            fc=r.mlp.c_fc,
            proj=r.mlp.c_proj,
        )
    return out


def _block_fields(resblocks: Any, where: str) -> dict[str, Any]:
    """A tower config's ``layers``, ``heads``, ``mlp_width`` and ``activation``, from its blocks."""
    if not len(resblocks):
        return {"layers": 0, "heads": 1, "mlp_width": None, "activation": "gelu"}
    first = resblocks[0]
    return {
        "layers": len(resblocks),
        "heads": first.attn.num_heads,
        "mlp_width": first.mlp.c_fc.out_features,
        "activation": _activation(first, where),
    }


def _projection(proj: Any, where: str) -> Tensor:
    """open_clip stores projections as ``x @ P`` matrices ``(width, out)``; ours are Linear."""
    if isinstance(proj, nn.Linear):
        if proj.bias is not None:
            raise NotImplementedError(f"from_open_clip: the {where} projection has a bias")
        return proj.weight
    if isinstance(proj, Tensor):
        return proj.T
    raise NotImplementedError(f"from_open_clip: the {where} tower has no projection")


def _check_model(model: nn.Module) -> None:
    """Refuse what diffkit's CLIP cannot hold exactly (towers, pooling, masks, biases)."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    if not isinstance(model, open_clip.CLIP):
        raise TypeError(
            f"from_open_clip: expected an open_clip.CLIP, got {type(model).__name__} "
            "(CustomTextCLIP / CoCa / timm towers are not supported)"
        )
    m: Any = model
    visual: Any = m.visual
    if not isinstance(visual, VisionTransformer):
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
    (height, width), (patch_h, patch_w) = visual.image_size, visual.patch_size
    if height != width or patch_h != patch_w:
        raise NotImplementedError("from_open_clip: only square images and patches are supported")


def _text_state(m: Any, projection: Tensor) -> dict[str, Tensor]:
    return {
        "text.token_embedding.weight": m.token_embedding.weight,
        "text.positional_embedding": m.positional_embedding,
        "text.ln_final.weight": m.ln_final.weight,
        "text.ln_final.bias": m.ln_final.bias,
        "text.projection.weight": projection,
    }


def _vision_state(visual: Any, projection: Tensor) -> dict[str, Tensor]:
    return {
        "vision.patch_embedding.weight": visual.conv1.weight.reshape(visual.conv1.out_channels, -1),
        "vision.class_embedding": visual.class_embedding,
        "vision.positional_embedding": visual.positional_embedding,
        "vision.ln_pre.weight": visual.ln_pre.weight,
        "vision.ln_pre.bias": visual.ln_pre.bias,
        "vision.ln_post.weight": visual.ln_post.weight,
        "vision.ln_post.bias": visual.ln_post.bias,
        "vision.projection.weight": projection,
    }


def from_open_clip(model: nn.Module) -> CLIP:
    """A diffkit [`CLIP`][diffkit.nn.clip.CLIP] with the weights of an open_clip ``CLIP``.

    Supports open_clip's standard ViT + transformer models (OpenAI and LAION ViT-B/L/H
    style): learned or sin-cos positions, class-token pooling, GELU or QuickGELU, text
    pooled at the largest id (``argmax``) or at ``eos_id``. ``encode_image`` and
    ``encode_text`` of the result equal the original's (``normalize`` either way).
    """
    _check_model(model)
    m: Any = model
    visual: Any = m.visual
    vision_blocks = _blocks(visual.transformer.resblocks, "vision")
    text_blocks = _blocks(m.transformer.resblocks, "text")
    text_proj = _projection(m.text_projection, "text")
    vision_proj = _projection(visual.proj, "image")
    text = TextTowerConfig(
        vocab_size=m.token_embedding.num_embeddings,
        context_length=m.positional_embedding.shape[0],
        width=m.token_embedding.embedding_dim,
        **_block_fields(m.transformer.resblocks, "text"),
        layer_norm_eps=m.ln_final.eps,
        eos_token_id=None if m.text_pool_type == "argmax" else m.text_eos_id,
    )
    vision = VisionTowerConfig(
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        channels=visual.conv1.in_channels,
        width=visual.conv1.out_channels,
        **_block_fields(visual.transformer.resblocks, "image"),
        layer_norm_eps=visual.ln_post.eps,
    )
    logit_scale = m.logit_scale.detach().reshape(())
    config = CLIPConfig(
        embed_dim=text_proj.shape[0],
        text=text,
        vision=vision,
        init_logit_scale=min(max(float(logit_scale), 0.0), MAX_LOGIT_SCALE),
    )
    state = {
        "logit_scale": logit_scale,
        **_text_state(m, text_proj),
        **_vision_state(visual, vision_proj),
        **text_blocks,
        **vision_blocks,
    }
    return load_converted(CLIP(config), state, m.token_embedding.weight, model.training)
