"""Tests for diffkit.nn.inputs: what the networks refuse before computing, naming the field."""

import pytest
import torch

import diffkit as dk
from diffkit.nn.inputs import check_times, validate_conditioning


def _small_nets(**cond: int) -> list[torch.nn.Module]:
    """A tiny U-Net, DiT and VideoDiT on 3-channel 4x4 inputs, with conditioning ``cond``."""
    transformer = {"in_channels": 3, "dim": 8, "depth": 1, "num_heads": 2, "freq_dim": 8}
    unet = {"base_channels": 4, "channel_mult": (1,), "norm_groups": 4}
    return [
        dk.nn.UNet(dk.nn.UNetConfig(**unet, attention_resolutions=(), mid_attention=False, **cond)),
        dk.nn.DiT(dk.nn.DiTConfig(**transformer, **cond)),
        dk.nn.VideoDiT(dk.nn.VideoDiTConfig(**transformer, **cond)),
    ]


def test_networks_reject_labels_out_of_range_naming_num_classes():
    for net in _small_nets(num_classes=3):
        shape = (2, 2, 3, 4, 4) if isinstance(net, dk.nn.VideoDiT) else (2, 3, 4, 4)
        x, t = torch.randn(shape), torch.rand(2)
        for bad in ([0, 3], [-1, 2]):
            cond = dk.Conditioning(labels=torch.tensor(bad))
            with pytest.raises(ValueError, match=r"Conditioning\.labels.*num_classes=3"):
                net(x, t, cond)
        assert net(x, t, dk.Conditioning(labels=torch.tensor([0, 2]))).shape == shape


def test_label_range_is_not_read_back_from_an_accelerator():
    # Reading labels off a device would be a host sync per denoiser call: only CPU is checked
    # (a meta tensor has no values, so any read-back would raise here).
    labels = torch.tensor([7], device="meta")
    validate_conditioning(
        "Net",
        torch.zeros(1),
        dk.Conditioning(labels=labels),
        context_dim=None,
        pooled_dim=None,
        num_classes=3,
    )


def test_networks_reject_a_conditioning_they_would_ignore_entirely():
    nets = _small_nets()
    given = dk.Conditioning(
        tokens=torch.randn(2, 5, 8), pooled=torch.randn(2, 7), labels=torch.tensor([0, 1])
    )
    for net in nets:
        name = type(net).__name__
        shape = (2, 2, 3, 4, 4) if isinstance(net, dk.nn.VideoDiT) else (2, 3, 4, 4)
        x, t = torch.randn(shape), torch.rand(2)
        with pytest.raises(
            ValueError,
            match=rf"^{name}: got Conditioning with tokens, pooled, labels but the network "
            r"uses none of them .*context_dim=\.\.\. or pass cond=None",
        ):
            net(x, t, given)
        with pytest.raises(ValueError, match=r"with labels but .*num_classes=\.\.\."):
            net(x, t, dk.Conditioning(labels=torch.tensor([0, 1])))
        # Nothing given is not misuse: an empty Conditioning is the same as cond=None.
        assert net(x, t, dk.Conditioning()).shape == shape
        assert net(x, t).shape == shape


def test_a_network_may_use_only_some_of_the_fields_it_is_given():
    # A CLIP text conditioner gives tokens and pooled; a cross-attention-only network uses the
    # tokens and ignores the pooled vector.
    cond = dk.Conditioning(tokens=torch.randn(1, 4, 8), pooled=torch.randn(1, 6))
    validate_conditioning(
        "Net", torch.zeros(1), cond, context_dim=8, pooled_dim=None, num_classes=None
    )
    labelled = dk.Conditioning(tokens=torch.randn(1, 4, 8), labels=torch.tensor([1]))
    validate_conditioning(
        "Net", torch.zeros(1), labelled, context_dim=None, pooled_dim=None, num_classes=3
    )


def test_networks_refuse_times_outside_zero_one() -> None:
    # the diffusers habit: integer-valued timesteps 0..999 passed as continuous t
    for net in _small_nets():
        shape = (2, 2, 3, 4, 4) if isinstance(net, dk.nn.VideoDiT) else (2, 3, 4, 4)
        x = torch.randn(shape)
        for bad in ([0.5, 500.0], [-0.1, 0.5], [float("nan"), 0.5]):
            with pytest.raises(ValueError, match=r"t must be continuous times in \[0, 1\]"):
                net(x, torch.tensor(bad))
        assert net(x, torch.tensor([0.0, 1.0])).shape == shape


def test_check_times_refuses_cpu_times_outside_zero_one_and_never_reads_a_device():
    check_times(torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"from -0\.1 to 0\.5"):
        check_times(torch.tensor([-0.1, 0.5]))
    check_times(torch.tensor([7.0], device="meta"))  # no values to read back: not checked


def test_network_timestep_is_maths_only():
    # the range policy lives in check_times, where a network takes t
    steps = dk.nn.layers.network_timestep(torch.tensor([2.0]), "t", 1000, 1000.0)
    assert torch.equal(steps, torch.tensor([2000.0]))
