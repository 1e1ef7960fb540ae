"""CLIP towers, contrastive loss, logit-scale clamp, zero-shot classifier (tiny configs)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from diffkit.nn.clip import (
    CLIP,
    CLIP_MODELS,
    MAX_LOGIT_SCALE,
    CLIPConfig,
    ResNetTower,
    ResNetTowerConfig,
    TextTowerConfig,
    VisionTowerConfig,
    ZeroShotClassifier,
    contrastive_loss,
)
from diffkit.tokenizers import ByteTokenizer
from diffkit.typing import ShapeError

CONTEXT = 16
MAX_F32 = float(torch.tensor(MAX_LOGIT_SCALE))  # ln 100 rounded to float32, as stored


def tiny_config(vision: str = "vit") -> CLIPConfig:
    tower = (
        VisionTowerConfig(image_size=8, patch_size=4, channels=1, width=32, layers=2, heads=4)
        if vision == "vit"
        else ResNetTowerConfig(
            image_size=8, channels=1, widths=(8, 16), blocks=(1, 1), norm_groups=4
        )
    )
    return CLIPConfig(
        embed_dim=16,
        text=TextTowerConfig(vocab_size=259, context_length=CONTEXT, width=32, layers=2, heads=4),
        vision=tower,
    )


@pytest.fixture(scope="module")
def model() -> CLIP:
    torch.manual_seed(0)
    return CLIP(tiny_config()).eval()


def inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, 8, 8, generator=g)
    texts = ["".join(chr(97 + int(i)) for i in torch.randint(0, 26, (5,), generator=g))]
    ids = ByteTokenizer(CONTEXT)(texts * batch)
    ids[:, 1:6] = torch.randint(1, 257, (batch, 5), generator=g)
    return images, ids


@given(batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_normalized_embeddings_have_unit_norm(model: CLIP, batch: int, seed: int) -> None:
    images, ids = inputs(batch, seed)
    with torch.no_grad():
        for z in (model.encode_image(images, normalize=True), model.encode_text(ids, True)):
            assert z.shape == (batch, 16)
            torch.testing.assert_close(z.norm(dim=-1), torch.ones(batch))


@given(batch=st.integers(2, 6), seed=st.integers(0, 2**16), data=st.data())
def test_loss_is_invariant_to_permuting_the_batch_consistently(
    model: CLIP, batch: int, seed: int, data: st.DataObject
) -> None:
    perm = torch.tensor(data.draw(st.permutations(range(batch))))
    images, ids = inputs(batch, seed)
    with torch.no_grad():
        torch.testing.assert_close(model.loss(images[perm], ids[perm]), model.loss(images, ids))


@given(batch=st.integers(2, 8), dim=st.integers(8, 16), seed=st.integers(0, 2**16))
def test_loss_is_near_zero_at_high_temperature_when_embeddings_coincide(
    batch: int, dim: int, seed: int
) -> None:
    # Orthonormal rows: each image's own caption is the only one it is similar to.
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    z = q[:batch].float()
    at_coincidence = contrastive_loss(z, z, torch.tensor(100.0))
    assert at_coincidence < 1e-6
    mismatched = contrastive_loss(z, z.roll(1, dims=0), torch.tensor(100.0))
    assert mismatched > at_coincidence + 1.0


@given(batch=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_loss_is_log_batch_when_all_embeddings_are_equal(batch: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(1, 8, generator=g), dim=-1).expand(batch, 8)
    loss = contrastive_loss(z, z, torch.tensor(30.0))
    torch.testing.assert_close(loss, torch.tensor(math.log(batch)))


def test_loss_is_symmetric_in_images_and_texts() -> None:
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    b = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    torch.testing.assert_close(contrastive_loss(a, b, 10.0), contrastive_loss(b, a, 10.0))


@given(raw=st.floats(-50, 50))
def test_logit_scale_stays_within_its_clamp(raw: float) -> None:
    torch.manual_seed(0)
    clip = CLIP(tiny_config())
    with torch.no_grad():
        clip.logit_scale.fill_(raw)
    assert 1.0 <= float(clip.scale().detach()) <= 100.0 * (1 + 1e-6)  # float32 rounding
    clip.clamp_logit_scale_()
    assert 0.0 <= float(clip.logit_scale.detach()) <= MAX_F32


def test_logit_scale_stays_clamped_through_training_steps() -> None:
    torch.manual_seed(0)
    clip = CLIP(tiny_config())
    opt = torch.optim.SGD([clip.logit_scale], lr=50.0)
    for _ in range(3):
        opt.zero_grad()
        (-clip.scale()).backward()  # pushes the scale up, far past ln 100
        opt.step()
        clip.clamp_logit_scale_()
        assert 0.0 <= float(clip.logit_scale.detach()) <= MAX_F32
    assert float(clip.logit_scale.detach()) == pytest.approx(MAX_LOGIT_SCALE)


@pytest.mark.parametrize(("raw", "bound"), [(-3.0, 0.0), (9.0, MAX_F32)])
def test_a_logit_scale_clamped_onto_a_bound_still_gets_a_gradient(raw: float, bound: float) -> None:
    torch.manual_seed(0)
    clip = CLIP(tiny_config())
    with torch.no_grad():
        clip.logit_scale.fill_(raw)
    clip.scale().backward()  # strictly outside the range: flat
    assert clip.logit_scale.grad is not None and float(clip.logit_scale.grad) == 0.0
    clip.logit_scale.grad = None
    clip.clamp_logit_scale_()
    assert float(clip.logit_scale.detach()) == bound
    clip.scale().backward()  # on the bound: d exp(s) / ds = exp(s), not torch clamp's 0
    assert clip.logit_scale.grad is not None
    assert float(clip.logit_scale.grad) == pytest.approx(math.exp(bound))


@pytest.mark.parametrize("call", ["loss", "forward"])
def test_a_training_forward_unsticks_a_logit_scale_pushed_past_ln_100(call: str) -> None:
    torch.manual_seed(0)
    clip = CLIP(tiny_config()).train()
    images, ids = inputs(4, 0)
    opt = torch.optim.SGD([clip.logit_scale], lr=50.0)
    opt.zero_grad()
    (-clip.scale()).backward()
    opt.step()  # overshoots, and no clamp_logit_scale_() afterwards
    assert float(clip.logit_scale.detach()) > MAX_F32
    for _ in range(2):
        opt.zero_grad()
        out = clip.loss(images, ids) if call == "loss" else clip(images, ids).square().mean()
        assert float(clip.logit_scale.detach()) == MAX_F32  # clamped by the forward
        out.backward()
        assert clip.logit_scale.grad is not None and float(clip.logit_scale.grad) != 0.0
    if call == "forward":  # squared logits want a lower scale: the temperature moves again
        opt.param_groups[0]["lr"] = 1e-3
        opt.step()
        assert float(clip.logit_scale.detach()) < MAX_F32


def test_eval_and_no_grad_forwards_leave_the_logit_scale_alone() -> None:
    torch.manual_seed(0)
    clip = CLIP(tiny_config())
    images, ids = inputs(3, 0)
    with torch.no_grad():
        clip.logit_scale.fill_(9.0)
    clip.eval()
    clip.loss(images, ids)
    clip(images, ids)
    clip.train()
    with torch.no_grad():
        clip.loss(images, ids)
    assert float(clip.logit_scale.detach()) == 9.0
    assert float(clip(images, ids).detach().abs().max()) <= 100.0 * (1 + 1e-6)
    assert float(clip.logit_scale.detach()) == MAX_F32


def test_two_training_losses_can_share_one_backward() -> None:
    torch.manual_seed(0)
    clip = CLIP(tiny_config()).train()
    (a, ids_a), (b, ids_b) = inputs(3, 0), inputs(3, 1)
    with torch.no_grad():
        clip.logit_scale.fill_(9.0)
    (clip.loss(a, ids_a) + clip.loss(b, ids_b)).backward()  # the in-place clamp bumps no version
    summed = clip.logit_scale.grad
    assert summed is not None and float(summed) != 0.0
    clip.zero_grad()
    clip.loss(a, ids_a).backward()
    clip.loss(b, ids_b).backward()
    torch.testing.assert_close(clip.logit_scale.grad, summed)


def test_initial_logit_scale_is_clips_temperature(model: CLIP) -> None:
    assert float(model.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)


@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_wrong_shaped_images_give_a_clear_error(vision: str) -> None:
    model = CLIP(tiny_config(vision))
    with pytest.raises(ShapeError, match=r"images must be \(batch, 1, 8, 8\)"):
        model.encode_image(torch.randn(2, 3, 8, 8))
    with pytest.raises(ShapeError, match=r"images must be \(batch, 1, 8, 8\)"):
        model.encode_image(torch.randn(2, 1, 12, 12))
    with pytest.raises(ShapeError, match="images"):
        model.encode_image(torch.randn(1, 8, 8))


def test_too_many_token_positions_give_a_clear_error(model: CLIP) -> None:
    with pytest.raises(ShapeError, match="more than context_length 16"):
        model.encode_text(torch.zeros(1, CONTEXT + 1, dtype=torch.long))


def test_token_ids_outside_the_vocabulary_are_refused_by_name(model: CLIP) -> None:
    ids = torch.zeros(2, 4, dtype=torch.long)
    ids[1, 2] = 259  # vocab_size 259: the largest id is 258
    with pytest.raises(
        ValueError, match=r"token_ids must be in \[0, vocab_size=259\), got ids from 0 to 259"
    ):
        model.text(ids)
    ids[1, 2] = -1
    with pytest.raises(ValueError, match=r"token_ids .* got ids from -1 to 0"):
        model.encode_text(ids)
    ids[1, 2] = 258
    assert model.encode_text(ids).shape[0] == 2


def test_loss_needs_as_many_images_as_texts(model: CLIP) -> None:
    images, ids = inputs(3, 0)
    with pytest.raises(ShapeError, match="batch"):
        model.loss(images, ids[:2])
    assert model(images, ids[:2]).shape == (3, 2)  # logits allow any pairing


def test_text_tower_is_causal_and_pools_at_the_end_token(model: CLIP) -> None:
    tok = ByteTokenizer(CONTEXT)
    ids = tok(["seven", "a 7"])
    with torch.no_grad():
        hidden, pooled = model.text(ids)
        end = (ids == tok.eot_token_id).int().argmax(dim=1)
        torch.testing.assert_close(pooled, hidden[torch.arange(2), end])
        # what follows the end token cannot change anything up to it
        changed = ids.clone()
        changed[0, end[0] + 1 :] = 42
        hidden2, pooled2 = model.text(changed)
    torch.testing.assert_close(pooled2, pooled)
    torch.testing.assert_close(hidden2[0, : end[0] + 1], hidden[0, : end[0] + 1])
    assert not torch.allclose(hidden2[0, end[0] + 1 :], hidden[0, end[0] + 1 :])


def test_eos_pooling_uses_the_first_eos_id() -> None:
    torch.manual_seed(0)
    tower_cfg = TextTowerConfig(
        vocab_size=20, context_length=6, width=16, layers=1, heads=2, eos_token_id=3
    )
    from diffkit.nn.clip import TextTower

    tower = TextTower(tower_cfg).eval()
    ids = torch.tensor([[1, 5, 3, 19, 3, 0]])
    hidden, pooled = tower(ids)
    torch.testing.assert_close(pooled, hidden[:, 2])


def test_patch_embedding_is_a_strided_convolution(model: CLIP) -> None:
    images, _ = inputs(2, 3)
    vision = model.vision
    weight = vision.patch_embedding.weight.reshape(32, 1, 4, 4)
    conv = F.conv2d(images, weight, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(vision.patch_embedding(vision.patches.patchify(images)), conv)


def test_zero_shot_classifier_averages_normalized_prompts_per_class(model: CLIP) -> None:
    tok = ByteTokenizer(CONTEXT)
    templates = ["a {}", "the digit {}", lambda c: f"{c}!"]
    clf = ZeroShotClassifier.from_prompts(model, tok, ["one", "two"], templates)
    with torch.no_grad():
        for k, name in enumerate(["one", "two"]):
            prompts = [t.format(name) if isinstance(t, str) else t(name) for t in templates]
            z = model.encode_text(tok(prompts), normalize=True).mean(dim=0)
            torch.testing.assert_close(clf.class_embeddings[k], F.normalize(z, dim=0))
        images, _ = inputs(3, 0)
        logits = clf(images)
    assert logits.shape == (3, 2)
    assert clf.predict(images).shape == (3,)
    with pytest.raises(ValueError, match="classnames is empty"):
        ZeroShotClassifier.from_prompts(model, tok, [], templates)
    with pytest.raises(ValueError, match="templates is empty"):
        ZeroShotClassifier.from_prompts(model, tok, ["one"], [])


@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_clip_overfits_a_few_pairs(vision: str) -> None:
    torch.manual_seed(0)
    clip = CLIP(tiny_config(vision))
    images, _ = inputs(4, 0)
    ids = ByteTokenizer(CONTEXT)(["zero", "one", "two", "three"])
    opt = torch.optim.Adam(clip.parameters(), lr=3e-3)
    first = clip.loss(images, ids).item()
    for _ in range(40):
        opt.zero_grad()
        loss = clip.loss(images, ids)
        loss.backward()
        opt.step()
        clip.clamp_logit_scale_()
    assert loss.item() < 0.1 < first
    assert (clip(images, ids).argmax(dim=1) == torch.arange(4)).all()


def test_config_round_trips_and_builds_through_the_registry() -> None:
    config = tiny_config()
    parsed = CLIP_MODELS.parse(config.to_json())
    assert parsed == config
    built = CLIP_MODELS.build(config.to_dict())
    assert isinstance(built, CLIP)
    assert sum(p.numel() for p in built.parameters()) == sum(
        p.numel() for p in CLIP(config).parameters()
    )
    with pytest.raises(ValueError, match="must divide"):
        VisionTowerConfig(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="must divide"):
        TextTowerConfig(width=30, heads=4)


def test_resnet_tower_builds_from_a_dict_and_gives_unit_embeddings() -> None:
    data = tiny_config("resnet").to_dict()
    assert data["vision"]["kind"] == "clip_resnet"
    clip = CLIP_MODELS.build(data)
    assert isinstance(clip, CLIP) and isinstance(clip.vision, ResNetTower)
    images, _ = inputs(3, 0)
    with torch.no_grad():
        tokens, pooled = clip.vision(images)
        z = clip.encode_image(images, normalize=True)
    assert tokens.shape == (3, 16, 16)  # 8x8 halved once: 4x4 positions of 16 channels
    assert pooled.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="one entry per stage"):
        ResNetTowerConfig(widths=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="must divide every width"):
        ResNetTowerConfig(widths=(8, 12), blocks=(1, 1), norm_groups=8)
