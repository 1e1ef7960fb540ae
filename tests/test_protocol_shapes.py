"""Every protocol method rejects a wrong shape or dtype with an error naming the argument."""

import re
from typing import Any, ClassVar, Protocol, runtime_checkable

import pytest
import torch

import diffkit as dk
from diffkit.nn import (
    DiT,
    DiTConfig,
    KLAutoencoder,
    KLAutoencoderConfig,
    UNet,
    UNetConfig,
    VideoDiT,
    VideoDiTConfig,
)
from diffkit.schedules import Cosine


def _unet() -> UNet:
    return UNet(
        UNetConfig(
            in_channels=2,
            base_channels=8,
            channel_mult=(1, 2),
            blocks_per_level=1,
            attention_resolutions=(),
            norm_groups=4,
            attention_head_dim=8,
        )
    )


def _vae() -> KLAutoencoder:
    return KLAutoencoder(
        KLAutoencoderConfig(
            in_channels=1,
            base_channels=8,
            channel_mult=(1, 2),
            blocks_per_level=1,
            latent_channels=2,
            norm_groups=4,
            mid_attention=False,
        )
    )


def _raises(fn: Any, *args: Any, match: str, **kwargs: Any) -> None:
    with pytest.raises(dk.ShapeError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("method", ["alpha", "sigma", "log_snr", "t_of_log_snr"])
def test_noise_schedule_methods_name_the_bad_argument(method: str) -> None:
    fn = getattr(Cosine(), method)
    _raises(fn, torch.zeros(2, 2), match=r"argument '(t|log_snr)' has 2 dimensions")
    _raises(fn, torch.zeros(2, dtype=torch.int64), match=r"argument '(t|log_snr)' has dtype")


def test_unet_denoiser_names_the_bad_argument_and_dimension() -> None:
    net = _unet()
    assert isinstance(net, dk.Denoiser)
    _raises(net, torch.zeros(2, 2, 8, 8), torch.zeros(3), match=r"'t' dimension 'batch' is 3")
    _raises(net, torch.zeros(2, 8, 8), torch.zeros(2), match=r"'x_t' has 3 dimensions")


def test_dit_and_video_denoisers_name_the_bad_argument() -> None:
    dit = DiT(DiTConfig(in_channels=2, patch_size=2, dim=16, depth=1, num_heads=2))
    _raises(dit, torch.zeros(2, 2, 8, 8), torch.zeros(1), match=r"'t' dimension 'batch' is 1")
    video = VideoDiT(
        VideoDiTConfig(in_channels=2, patch_size=(2, 2, 2), dim=16, depth=1, num_heads=2)
    )
    _raises(video, torch.zeros(2, 2, 8, 8), torch.zeros(2), match=r"'x_t' has 4 dimensions")


def test_sampler_names_the_bad_argument() -> None:
    sampler = dk.samplers.REGISTRY["dpmpp_2m"]()
    assert isinstance(sampler, dk.Sampler)
    _raises(
        sampler.sample,
        _unet(),
        Cosine(),
        torch.zeros(2, 2, 8, 8, dtype=torch.int64),
        steps=2,
        match=r"argument 'noise' has dtype",
    )


def test_encoder_methods_name_the_bad_argument() -> None:
    vae = _vae()
    assert isinstance(vae, dk.Encoder)
    _raises(vae.encode, torch.zeros(8, 8), match=r"KLAutoencoder.*got \(8,\)")
    _raises(vae.decode, torch.zeros(2, 8), match=r"got shape \(2, 8\)")
    _raises(vae.encode, torch.zeros(2, 1, 8, 8, dtype=torch.int64), match=r"'x' has dtype")


def test_patchifier_methods_name_the_bad_argument() -> None:
    spatial = dk.patches.SpatialPatches(2)
    assert isinstance(spatial, dk.Patchifier)
    _raises(spatial.patchify, torch.zeros(2, 8, 8), match=r"argument 'x' has 3 dimensions")
    _raises(spatial.unpatchify, torch.zeros(2, 16), (1, 8, 8), match=r"argument 'tokens'")
    tubelets = dk.patches.TubeletPatches((2, 2, 2))
    _raises(tubelets.patchify, torch.zeros(2, 1, 8, 8), match=r"argument 'x' has 4 dimensions")
    with pytest.raises(ValueError, match="height"):
        spatial.patchify(torch.zeros(1, 1, 7, 8))


def test_text_conditioner_rejects_empty_and_non_text_input() -> None:
    from diffkit.nn.clip import TextTowerConfig
    from diffkit.text import CLIPTextConditioner, CLIPTextConditionerConfig

    conditioner = CLIPTextConditioner.from_config(
        CLIPTextConditionerConfig(
            text=TextTowerConfig(vocab_size=260, context_length=8, width=16, layers=1, heads=2),
            tokenizer="byte",
        )
    )
    assert isinstance(conditioner, dk.TextConditioner)
    with pytest.raises(ValueError, match="empty list of texts"):
        conditioner.condition([])
    out = conditioner.condition(["a seven", "a one"])
    assert out.tokens is not None and out.tokens.shape == (2, 8, 16)


def test_conditioning_rejects_a_non_bool_mask_and_non_integer_labels() -> None:
    tokens = torch.zeros(2, 3, 4)
    # a tokenizer's 0/1 int64 attention_mask is the common mistake
    for mask in (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)):
        with pytest.raises(
            dk.ShapeError, match=r"'mask'.*dtype torch\.(int64|float32).*mask\.bool\(\)"
        ):
            dk.Conditioning(tokens=tokens, mask=mask)
    for labels in (torch.tensor([0.0, 1.0]), torch.tensor([True, False])):
        with pytest.raises(
            dk.ShapeError, match=r"'labels'.*dtype torch\.(float32|bool).*labels\.long\(\)"
        ):
            dk.Conditioning(labels=labels)
    ok = dk.Conditioning(tokens=tokens, mask=torch.ones(2, 3, dtype=torch.bool))
    assert ok.mask is not None and ok.mask.dtype == torch.bool
    for dtype in (torch.int64, torch.int32):
        assert dk.Conditioning(labels=torch.tensor([0, 2], dtype=dtype)).batch_size == 2
    # token ids are not embeddings
    with pytest.raises(dk.ShapeError, match=r"'tokens' must be floating-point.*torch\.int64"):
        dk.Conditioning(tokens=torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(dk.ShapeError, match=r"'pooled' must be floating-point.*torch\.int32"):
        dk.Conditioning(pooled=torch.zeros(2, 4, dtype=torch.int32))


def test_conditioning_cat_names_the_field_and_both_shapes() -> None:
    cond = dk.Conditioning(tokens=torch.zeros(2, 5, 8))
    for other in ((2, 7, 8), (2, 5, 4)):
        uncond = dk.Conditioning(tokens=torch.zeros(*other))
        shapes = rf"\(2, 5, 8\) on one side and {re.escape(str(other))}"
        with pytest.raises(dk.ShapeError, match=rf"'tokens' has shape {shapes}.*context length"):
            cond.cat(uncond)
    both = cond.cat(dk.Conditioning(tokens=torch.ones(1, 5, 8)))
    assert both.tokens is not None and both.tokens.shape == (3, 5, 8)


def test_conditioning_where_names_the_field_and_both_context_lengths() -> None:
    """A different (or 1-token) uncond context length was a raw expand error or broadcast."""
    cond = dk.Conditioning(tokens=torch.zeros(4, 16, 8), mask=torch.ones(4, 16, dtype=torch.bool))
    keep = torch.tensor([True, False, True, False])
    for length in (8, 1):
        uncond = dk.Conditioning(
            tokens=torch.ones(1, length, 8), mask=torch.ones(1, length, dtype=torch.bool)
        )
        expected = rf"'tokens' has shape \(4, 16, 8\).*\(1, {length}, 8\).*lengths 16 and {length}"
        with pytest.raises(dk.ShapeError, match=expected):
            cond.where(keep, uncond)
    with pytest.raises(dk.ShapeError, match=r"'tokens'.*batch must be 1 or 4"):
        cond.where(keep, dk.Conditioning(tokens=torch.ones(2, 16, 8)))
    with pytest.raises(dk.ShapeError, match=r"'tokens'.*\(1, 16, 4\)"):
        cond.where(keep, dk.Conditioning(tokens=torch.ones(1, 16, 4)))
    # batch 1 broadcasts; an unset field becomes zeros (an all-False mask)
    out = cond.where(keep, dk.Conditioning(tokens=torch.ones(1, 16, 8)))
    assert out.tokens is not None and out.mask is not None
    assert out.tokens[:, 0, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert out.mask[:, 0].tolist() == keep.tolist()


def _conditioned_denoisers() -> list[tuple[torch.nn.Module, tuple[int, ...], tuple[int, ...]]]:
    """(denoiser, input shape, output shape) with every conditioning, attention and MLP kind."""
    cond = {"context_dim": 6, "pooled_dim": 5, "num_classes": 3}
    unet = {
        "in_channels": 2,
        "out_channels": 1,
        "base_channels": 8,
        "channel_mult": (1, 2),
        "blocks_per_level": 1,
        "attention_resolutions": (1, 2),
        "norm_groups": 4,
        "attention_head_dim": 4,
    }
    dit = DiTConfig(in_channels=2, out_channels=1, dim=16, depth=1, num_heads=2, freq_dim=8, **cond)
    video = {"in_channels": 2, "out_channels": 1, "dim": 16, "depth": 1, "num_heads": 2}
    video |= {"freq_dim": 8, **cond}
    image, video_shape = (2, 8, 8), (2, 2, 8, 8)
    return [
        (UNet(UNetConfig(**unet, **cond)), image, (1, 8, 8)),  # cross-attention
        (UNet(UNetConfig(**unet, **{**cond, "context_dim": None})), image, (1, 8, 8)),
        (DiT(dit), image, (1, 8, 8)),
        *(
            (VideoDiT(VideoDiTConfig(**video, **u)), video_shape, (2, 1, 8, 8))
            for u in ({}, {"attention": "full"}, {"local_mlp": True})
        ),
    ]


def test_every_network_maps_an_empty_batch_to_an_empty_output() -> None:
    # as torch's own layers (and DiT) do: batch 0 in, batch 0 out, nothing inferred from it
    cond = dk.Conditioning(
        tokens=torch.zeros(0, 3, 6),
        mask=torch.zeros(0, 3, dtype=torch.bool),
        pooled=torch.zeros(0, 5),
        labels=torch.zeros(0, dtype=torch.long),
    )
    for model, shape, out_shape in _conditioned_denoisers():
        with torch.no_grad():
            out = model(torch.zeros(0, *shape), torch.zeros(0), cond)
        assert out.shape == (0, *out_shape), type(model).__name__
    vae = _vae()
    for shape in ((1, 8, 8), (3, 1, 8, 8)):  # images and videos
        with torch.no_grad():
            z = vae.encode(torch.zeros(0, *shape))
            assert z.shape == (0, *vae.latent_shape(shape))
            assert vae.decode(z).shape == (0, *shape)


class _Forwarding:
    """Forwards every attribute to the wrapped object, as EMA / DDP-style wrappers do."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner(*args, **kwargs)


def test_protocol_checks_accept_objects_that_forward_their_attributes() -> None:
    net = _unet()
    # torch.compile's wrapper forwards `prediction` through __getattr__ (nothing compiles yet)
    assert isinstance(torch.compile(net), dk.Denoiser)
    assert isinstance(_Forwarding(net), dk.Denoiser)
    assert isinstance(_Forwarding(Cosine()), dk.NoiseSchedule)
    assert isinstance(_Forwarding(_vae()), dk.Encoder)
    sampler = dk.samplers.REGISTRY["ddim"]()
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = sampler.sample(net, Cosine(), noise, steps=3)
        wrapped = sampler.sample(_Forwarding(net), _Forwarding(Cosine()), noise, steps=3)
    torch.testing.assert_close(wrapped, direct, rtol=0, atol=0)


def test_protocol_checks_name_the_missing_members() -> None:
    sampler = dk.samplers.REGISTRY["ddim"]()

    def bare(x: torch.Tensor, t: torch.Tensor, cond: object = None) -> torch.Tensor:
        return x

    match = r"argument 'denoiser' must be Denoiser, got function \(missing: prediction\)"
    _raises(sampler.sample, bare, Cosine(), torch.zeros(2, 3), steps=2, match=match)
    match = r"argument 'schedule' must be NoiseSchedule, got UNet \(missing: alpha, log_snr,"
    _raises(sampler.sample, _unet(), _unet(), torch.zeros(2, 3), steps=2, match=match)
    assert not isinstance(object(), dk.Denoiser)


def test_protocol_checks_keep_typing_semantics() -> None:
    class OptedOut(Cosine):
        alpha: ClassVar[None] = None  # a method set to None opts out, as in typing

    assert not isinstance(OptedOut(), dk.NoiseSchedule)

    class Nominal(dk.NoiseSchedule):  # a subclass of a protocol is an ordinary class
        pass

    assert not isinstance(Cosine(), Nominal)
    assert isinstance(Nominal(), Nominal)
    assert isinstance(Nominal(), dk.NoiseSchedule)

    class Declared(dk.Denoiser):  # subclassed explicitly, `prediction` not set (yet)
        def __call__(self, x_t: Any, t: Any, cond: Any = None) -> Any:
            return x_t

    assert isinstance(Declared(), dk.Denoiser)  # as typing answers


def test_a_subprotocol_defined_after_a_check_has_only_its_declared_members() -> None:
    assert isinstance(_unet(), dk.Denoiser)  # the check caches Denoiser's members

    @runtime_checkable
    class Named(dk.Denoiser, Protocol):
        name: str

    class Model:
        prediction = "epsilon"
        name = "m"

        def __call__(self, x: Any, t: Any, cond: Any = None) -> Any:
            return x

    assert isinstance(Model(), Named)
    assert not isinstance(_unet(), Named)
