"""transformers text encoders -> diffkit: ``CLIPTextModel`` / ``CLIPTextModelWithProjection``
-> ``TextTower``, ``T5EncoderModel`` -> ``T5Encoder``."""

from typing import TYPE_CHECKING, Any, overload

import torch
from torch import Tensor, nn

from diffkit.interop._clip import block_state, load_converted
from diffkit.nn.clip import Activation, TextTower, TextTowerConfig
from diffkit.nn.t5 import T5Activation, T5Encoder, T5EncoderConfig

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

__all__ = ["from_transformers", "t5_config"]

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


_T5_ACTIVATIONS: dict[str, T5Activation] = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


def t5_config(cfg: Any) -> T5EncoderConfig:
    """The [`T5EncoderConfig`][diffkit.nn.t5.T5EncoderConfig] of a transformers ``T5Config``;
    an option diffkit's encoder would not honour is refused by name."""
    if cfg.dense_act_fn not in _T5_ACTIVATIONS:
        raise ValueError(
            f"from_transformers: feed_forward_proj={cfg.feed_forward_proj!r} (activation "
            f"{cfg.dense_act_fn!r}) is not supported; supported: relu, gelu, gelu_new, "
            "gated-gelu, gated-relu"
        )
    if getattr(cfg, "is_decoder", False):
        raise ValueError("from_transformers: is_decoder=True; a T5 encoder is bidirectional")
    return T5EncoderConfig(
        vocab_size=cfg.vocab_size,
        width=cfg.d_model,
        layers=cfg.num_layers,
        heads=cfg.num_heads,
        head_dim=cfg.d_kv,
        mlp_width=cfg.d_ff,
        activation=_T5_ACTIVATIONS[cfg.dense_act_fn],
        gated=bool(cfg.is_gated_act),
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance,
        layer_norm_eps=cfg.layer_norm_epsilon,
    )


def _t5_state(model: Any, config: T5EncoderConfig) -> dict[str, Tensor]:
    """diffkit ``T5Encoder`` entries from a ``T5EncoderModel``."""
    stack = model.encoder
    first = stack.block[0].layer[0].SelfAttention if len(stack.block) else None
    if first is None:
        raise ValueError("from_transformers: a T5 encoder without blocks has no position bias")
    state: dict[str, Tensor] = {
        "token_embedding.weight": model.shared.weight,
        "relative_bias.weight": first.relative_attention_bias.weight,
        "final_norm.weight": stack.final_layer_norm.weight,
    }
    for i, block in enumerate(stack.block):
        attn, ff = block.layer[0], block.layer[1]
        mlp = ff.DenseReluDense
        state |= {
            f"blocks.{i}.norm1.weight": attn.layer_norm.weight,
            f"blocks.{i}.attn.qkv.weight": torch.cat(
                [
                    attn.SelfAttention.q.weight,
                    attn.SelfAttention.k.weight,
                    attn.SelfAttention.v.weight,
                ]
            ),
            f"blocks.{i}.attn.out.weight": attn.SelfAttention.o.weight,
            f"blocks.{i}.norm2.weight": ff.layer_norm.weight,
            # diffkit's gated MLP is a * act(g) with [a; g] = proj_in(x): [wi_1; wi_0]
            f"blocks.{i}.mlp.proj_in.weight": (
                torch.cat([mlp.wi_1.weight, mlp.wi_0.weight]) if config.gated else mlp.wi.weight
            ),
            f"blocks.{i}.mlp.proj_out.weight": mlp.wo.weight,
        }
    return state


def _from_t5(model: Any) -> T5Encoder:
    config = t5_config(model.config)
    encoder = T5Encoder(config)
    state = _t5_state(model, config)
    return load_converted(encoder, state, model.shared.weight, model.training)


@overload
def from_transformers(clip_text_model: "T5EncoderModel") -> T5Encoder: ...
@overload
def from_transformers(
    clip_text_model: "CLIPTextModel | CLIPTextModelWithProjection",
) -> TextTower: ...
@overload
def from_transformers(clip_text_model: nn.Module) -> TextTower | T5Encoder: ...
def from_transformers(clip_text_model: nn.Module) -> TextTower | T5Encoder:
    """A diffkit [`TextTower`][diffkit.nn.clip.TextTower] holding a transformers CLIP text model,
    or a [`T5Encoder`][diffkit.nn.t5.T5Encoder] holding a ``T5EncoderModel``.

    A T5 encoder's ``encoder(ids, mask)`` equals ``last_hidden_state`` of
    ``model(input_ids=ids, attention_mask=mask)``; transformers' float16 clamping of
    infinities is not reproduced (convert in float32 / bfloat16).

    ``tower(ids)`` returns ``(tokens, pooled)`` equal to the model's ``last_hidden_state``
    and ``pooler_output`` for the same ``input_ids`` (no attention mask: CLIP's causal
    mask only). From ``CLIPTextModelWithProjection`` the projection is kept too, so
    ``tower.encode(ids)`` equals its ``text_embeds``. Pooling follows transformers: at the
    largest id when ``config.eos_token_id == 2`` (old configs), else at the first
    ``eos_token_id``. Wrap the result in ``diffkit.text.CLIPTextConditioner``.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    if isinstance(clip_text_model, T5EncoderModel):
        return _from_t5(clip_text_model)
    if not isinstance(clip_text_model, CLIPTextModel | CLIPTextModelWithProjection):
        raise TypeError(
            "from_transformers: expected a transformers CLIPTextModel, "
            f"CLIPTextModelWithProjection or T5EncoderModel, got {type(clip_text_model).__name__}"
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
