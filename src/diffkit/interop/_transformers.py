"""transformers ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) -> diffkit ``TextTower``."""

from typing import Any

import torch
from torch import Tensor, nn

from diffkit.interop._clip import block_state, load_converted
from diffkit.nn.clip import Activation, TextTower, TextTowerConfig

__all__ = ["from_transformers"]

_ACTIVATIONS: dict[str, Activation] = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def _config(cfg: Any) -> TextTowerConfig:
    """The tower config of a transformers ``CLIPTextConfig``."""
    if cfg.hidden_act not in _ACTIVATIONS:
        raise NotImplementedError(
            f"from_transformers: activation {cfg.hidden_act!r} is not supported "
            "(quick_gelu or gelu)"
        )
    eos = cfg.eos_token_id
    if isinstance(eos, list):
        raise NotImplementedError("from_transformers: several eos_token_ids are not supported")
    return TextTowerConfig(
        activation=_ACTIVATIONS[cfg.hidden_act],
        vocab_size=cfg.vocab_size,
        context_length=cfg.max_position_embeddings,
        width=cfg.hidden_size,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        mlp_width=cfg.intermediate_size,
        layer_norm_eps=cfg.layer_norm_eps,
        # transformers keeps CLIP's argmax rule for configs from before its eos fix (id 2)
        eos_token_id=None if eos == 2 else eos,
    )


def _state(core: Any) -> dict[str, Tensor]:
    """diffkit ``TextTower`` entries from a ``CLIPTextTransformer`` (no projection)."""
    state: dict[str, Tensor] = {
        "token_embedding.weight": core.embeddings.token_embedding.weight,
        "positional_embedding": core.embeddings.position_embedding.weight,
        "ln_final.weight": core.final_layer_norm.weight,
        "ln_final.bias": core.final_layer_norm.bias,
    }
    for i, layer in enumerate(core.encoder.layers):
        attn = layer.self_attn
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        state |= block_state(
            f"blocks.{i}.",
            ln_1=layer.layer_norm1,
            qkv=(torch.cat([q.weight, k.weight, v.weight]), torch.cat([q.bias, k.bias, v.bias])),
            out=attn.out_proj,
            ln_2=layer.layer_norm2,
            fc=layer.mlp.fc1,
            proj=layer.mlp.fc2,
        )
    return state


def from_transformers(clip_text_model: nn.Module) -> TextTower:
    """A diffkit [`TextTower`][diffkit.nn.clip.TextTower] holding a transformers CLIP text model.

    ``tower(ids)`` returns ``(tokens, pooled)`` equal to the model's ``last_hidden_state``
    and ``pooler_output`` for the same ``input_ids`` (no attention mask: CLIP's causal
    mask only). From ``CLIPTextModelWithProjection`` the projection is kept too, so
    ``tower.encode(ids)`` equals its ``text_embeds``. Pooling follows transformers: at the
    largest id when ``config.eos_token_id == 2`` (old configs), else at the first
    ``eos_token_id``. Wrap the result in ``diffkit.text.CLIPTextConditioner``.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not isinstance(clip_text_model, CLIPTextModel | CLIPTextModelWithProjection):
        raise TypeError(
            "from_transformers: expected a transformers CLIPTextModel or "
            f"CLIPTextModelWithProjection, got {type(clip_text_model).__name__}"
        )
    model: Any = clip_text_model
    config = _config(model.config)
    # transformers 4.x nests the layers in `text_model` (CLIPTextTransformer); 5.x puts them
    # on CLIPTextModel itself, and CLIPTextModelWithProjection wraps either in `text_model`.
    core: Any = model.text_model if isinstance(model, CLIPTextModelWithProjection) else model
    if not hasattr(core, "embeddings"):
        core = core.text_model
    state = _state(core)
    projection: Any = getattr(model, "text_projection", None)
    proj_dim = None
    if projection is not None:
        proj_dim = projection.out_features
        state["projection.weight"] = projection.weight
    tower = TextTower(config, proj_dim=proj_dim)
    return load_converted(tower, state, core.embeddings.token_embedding.weight, model.training)
