"""diffkit CLIP vs open_clip on small random models (no downloads), and tokenizer ids."""

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from open_clip.loss import ClipLoss  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402

import diffkit as dk  # noqa: E402
from diffkit.nn.clip import CLIP, ZeroShotClassifier, contrastive_loss  # noqa: E402
from diffkit.text import CLIPTextConditioner, OpenCLIPTextConditioner  # noqa: E402
from diffkit.tokenizers import CLIPTokenizer, find_open_clip_vocab  # noqa: E402

pytestmark = pytest.mark.parity

VOCAB = 49408
CONTEXT = 16


def random_open_clip(
    quick_gelu: bool, pool: str = "argmax", pos_embed: str = "learnable", seed: int = 0
) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=CLIPVisionCfg(
            layers=2, width=32, head_width=8, patch_size=4, image_size=16, pos_embed_type=pos_embed
        ),
        text_cfg=CLIPTextCfg(
            context_length=CONTEXT,
            vocab_size=VOCAB,
            width=32,
            heads=4,
            layers=2,
            pool_type=pool,
            eos_id=VOCAB - 1,
        ),
        quick_gelu=quick_gelu,
    ).eval()
    with torch.no_grad():  # move LayerNorms and biases off their identity init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(find_open_clip_vocab(), context_length=CONTEXT)


TEXTS = ["a photo of a cat", "the number 7", "", "a picture of a very small handwritten seven"]


@pytest.mark.parametrize(
    ("quick_gelu", "pool", "pos_embed"),
    [(False, "argmax", "learnable"), (True, "argmax", "learnable"), (False, "eos", "sin_cos_2d")],
)
@pytest.mark.parametrize("normalize", [False, True])
def test_from_open_clip_matches_encode_image_and_encode_text(
    tokenizer: CLIPTokenizer, quick_gelu: bool, pool: str, pos_embed: str, normalize: bool
) -> None:
    ref = random_open_clip(quick_gelu, pool, pos_embed)
    ours = dk.interop.from_open_clip(ref)
    assert isinstance(ours, CLIP)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.encode_image(images, normalize=normalize),
            ref.encode_image(images, normalize=normalize),
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(
            ours.encode_text(ids, normalize=normalize),
            ref.encode_text(ids, normalize=normalize),
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(
            ours.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=0
        )


def test_logits_and_loss_match_open_clip(tokenizer: CLIPTokenizer) -> None:
    ref = random_open_clip(False)
    ours = dk.interop.from_open_clip(ref)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ids = tokenizer(TEXTS)
    with torch.no_grad():
        logits_per_image, _ = ref.get_logits(images, ids)
        torch.testing.assert_close(ours(images, ids), logits_per_image, atol=1e-4, rtol=1e-5)
        image = ref.encode_image(images, normalize=True)
        text = ref.encode_text(ids, normalize=True)
        scale = ref.logit_scale.exp()
        torch.testing.assert_close(
            contrastive_loss(image, text, scale), ClipLoss()(image, text, scale), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(ours.loss(images, ids), ClipLoss()(image, text, scale))


@pytest.mark.parametrize(("skip_last_layers", "final_norm"), [(0, True), (1, True), (2, False)])
def test_open_clip_text_conditioner_matches_the_converted_tower(
    tokenizer: CLIPTokenizer, skip_last_layers: int, final_norm: bool
) -> None:
    ref = random_open_clip(True)
    options = dict(project_pooled=True, skip_last_layers=skip_last_layers, final_norm=final_norm)
    ours = CLIPTextConditioner(dk.interop.from_open_clip(ref).text, tokenizer, **options)
    wrapped = OpenCLIPTextConditioner(ref, tokenizer, **options)
    with torch.no_grad():
        a, b = wrapped.condition(TEXTS), ours.condition(TEXTS)
        assert a.tokens is not None and b.tokens is not None
        assert a.pooled is not None and b.pooled is not None
        torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.pooled, ref.encode_text(tokenizer(TEXTS)), atol=1e-6, rtol=0)
    assert a.mask is not None and b.mask is not None
    assert torch.equal(a.mask, b.mask)


def test_unsupported_open_clip_models_are_refused() -> None:
    torch.manual_seed(0)
    layer_scale = open_clip.CLIP(
        embed_dim=8,
        vision_cfg=CLIPVisionCfg(
            layers=1, width=16, head_width=8, patch_size=4, image_size=8, ls_init_value=0.1
        ),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
    )
    with pytest.raises(NotImplementedError, match="layer scale"):
        dk.interop.from_open_clip(layer_scale)
    with pytest.raises(TypeError, match=r"expected an open_clip\.CLIP"):
        dk.interop.from_open_clip(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("pool", ["first", "last"])
def test_unsupported_text_pooling_is_named_as_such(pool: str) -> None:
    model = open_clip.CLIP(
        embed_dim=8,
        vision_cfg=CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=4, image_size=8),
        text_cfg=CLIPTextCfg(
            context_length=8, vocab_size=50, width=16, heads=2, layers=1, pool_type=pool
        ),
    )
    assert model.attn_mask is not None  # causal: only the pooling is unsupported
    with pytest.raises(NotImplementedError, match=f"text pooling '{pool}' is not supported") as e:
        dk.interop.from_open_clip(model)
    assert "causal" not in str(e.value) and "'argmax'" in str(e.value)


def test_a_text_tower_without_a_causal_mask_is_refused_as_such() -> None:
    model = open_clip.CLIP(
        embed_dim=8,
        vision_cfg=CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=4, image_size=8),
        text_cfg=CLIPTextCfg(
            context_length=8, vocab_size=50, width=16, heads=2, layers=1, no_causal_mask=True
        ),
    )
    assert model.text_pool_type == "argmax" and model.attn_mask is None
    with pytest.raises(NotImplementedError, match="without a causal mask") as e:
        dk.interop.from_open_clip(model)
    assert "pooling" not in str(e.value)


TRICKY = [
    "a photo of a cat",
    "Hello, World!!! ...",
    "it's   don't they'll we'd I'M You'RE",
    "café naïve résumé Ångström",
    "日本語のテキスト 中文 한국어",
    "emoji 😀🎉👍🏽 ok",
    "&amp;lt;b&amp;gt; &quot;quoted&quot; &#39;x&#39; &nbsp;",
    "tabs\tand\nnew lines \r\n  ",
    "",
    "   ",
    "x" * 300,
    " ".join(["word"] * 100),
    "½ ² Ⅻ 3.14159 1,000,000 ٣",
    "<start_of_text>hi<end_of_text>",
    "!!'s <<start_of_text> don’t “curly quotes”",
    "ﬁ ligature ＦＵＬＬＷＩＤＴＨ",
    "Ã©mojibake",
    "mixed123abc456",
    "__init__.py --flag=3 a_b-c",
    "zero\u200bwidth \u00a0nbsp\u2003em",
    "Ünïcödé ß ΣΊΣΥΦΟΣ",
]


@pytest.mark.parametrize("context_length", [77, 8])
def test_tokenizer_ids_match_open_clip_on_tricky_strings(context_length: int) -> None:
    ours = CLIPTokenizer(find_open_clip_vocab(), context_length=context_length)
    ref = SimpleTokenizer(context_length=context_length)
    assert ours.vocab_size == ref.vocab_size
    assert (ours.sot_token_id, ours.eot_token_id) == (ref.sot_token_id, ref.eot_token_id)
    assert torch.equal(ours(TRICKY), ref(TRICKY))
    for text in TRICKY:
        assert ours.encode(text) == ref.encode(text)


def test_tokenizer_decode_matches_open_clip() -> None:
    ours = CLIPTokenizer.from_open_clip()
    ref = SimpleTokenizer()
    for text in TRICKY[:8]:
        ids = ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids)


def test_zero_shot_classifier_matches_open_clips(tokenizer: CLIPTokenizer) -> None:
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    ref = random_open_clip(False)
    ours = dk.interop.from_open_clip(ref)
    names, templates = ["cat", "dog", "seven"], ["a photo of a {}.", "the {}"]
    clf = ZeroShotClassifier.from_prompts(ours, tokenizer, names, templates)
    expected = build_zero_shot_classifier(ref, tokenizer, names, templates, use_tqdm=False)
    torch.testing.assert_close(clf.class_embeddings, expected.T, atol=1e-5, rtol=0)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref_logits = F.normalize(ref.encode_image(images), dim=-1) @ expected
    torch.testing.assert_close(clf(images) / ours.scale(), ref_logits, atol=1e-5, rtol=0)
