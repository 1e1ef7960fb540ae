"""Train a small CLIP on scikit-learn's digits with generated captions; diffkit vs open_clip.

Both libraries train a same-sized ViT CLIP from scratch, in the same run, on the same
images (8x8 digits upscaled to 16x16, 80/20 seeded split), the same freshly sampled
captions (five templates per digit, e.g. "a handwritten digit seven", "the number 7"),
the same CLIP BPE tokenizer, optimiser and schedule. Reported on the held-out images:

- zero-shot accuracy: each class embedding is the mean of its five prompts' normalised
  text embeddings (CLIP's prompt ensembling); an image gets the most similar class;
- retrieval recall@1, image->text and text->image, over the held-out images and their
  one caption each: a hit when the top-ranked item shows / names the same digit (many
  captions are identical, "the number 7", so instance-level recall would be ties);
- training time: median milliseconds per step and the total.

    python benchmarks/clip_digits.py            # ~ a few minutes on 2 CPU threads
    python benchmarks/clip_digits.py --steps 200 --libraries diffkit
    python benchmarks/clip_digits.py --libraries diffkit --vision resnet
"""

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkit.nn.clip import (
    CLIP,
    CLIPConfig,
    ResNetTowerConfig,
    TextTowerConfig,
    VisionTowerConfig,
    contrastive_loss,
)
from diffkit.tokenizers import ByteTokenizer, CLIPTokenizer, Tokenizer
from diffkit_demo.datasets import DIGIT_NAMES, IMAGE_TEMPLATES, load_digits

IMAGE_SIZE = 16


@dataclass
class Sizes:
    embed: int = 64
    width: int = 64
    text_layers: int = 2
    vision_layers: int = 3
    heads: int = 4
    patch: int = 4
    context: int = 16


def caption(template: str, digit: int) -> str:
    return template.format(digit=digit, name=DIGIT_NAMES[digit])


class Encoders:
    """What the loop needs from a model: normalised encoders, the scale, clamping."""

    def __init__(
        self,
        model: nn.Module,
        encode_image: Callable[[Tensor], Tensor],
        encode_text: Callable[[Tensor], Tensor],
        log_scale: nn.Parameter,
        loss: Callable[[Tensor, Tensor, Tensor], Tensor],
    ) -> None:
        self.model, self.encode_image, self.encode_text = model, encode_image, encode_text
        self.log_scale, self.loss = log_scale, loss


def build_diffkit(sizes: Sizes, vocab: int, vision: str = "vit") -> Encoders:
    tower: VisionTowerConfig | ResNetTowerConfig = VisionTowerConfig(
        image_size=IMAGE_SIZE,
        patch_size=sizes.patch,
        channels=1,
        width=sizes.width,
        layers=sizes.vision_layers,
        heads=sizes.heads,
    )
    if vision == "resnet":
        tower = ResNetTowerConfig(
            image_size=IMAGE_SIZE, channels=1, widths=(32, 64), blocks=(1, 1), norm_groups=8
        )
    config = CLIPConfig(
        embed_dim=sizes.embed,
        text=TextTowerConfig(
            vocab_size=vocab,
            context_length=sizes.context,
            width=sizes.width,
            layers=sizes.text_layers,
            heads=sizes.heads,
        ),
        vision=tower,
    )
    model = CLIP(config)
    return Encoders(
        model,
        lambda x: model.encode_image(x, normalize=True),
        lambda ids: model.encode_text(ids, normalize=True),
        model.logit_scale,
        contrastive_loss,
    )


def build_open_clip(sizes: Sizes, vocab: int, vision: str = "vit") -> Encoders:
    import open_clip
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    model = open_clip.CLIP(
        embed_dim=sizes.embed,
        vision_cfg=CLIPVisionCfg(
            layers=sizes.vision_layers,
            width=sizes.width,
            head_width=sizes.width // sizes.heads,
            patch_size=sizes.patch,
            image_size=IMAGE_SIZE,
        ),
        text_cfg=CLIPTextCfg(
            context_length=sizes.context,
            vocab_size=vocab,
            width=sizes.width,
            heads=sizes.heads,
            layers=sizes.text_layers,
        ),
    )
    clip_loss = ClipLoss()
    # open_clip's ViT takes RGB: the grey digit is repeated over three channels
    return Encoders(
        model,
        lambda x: model.encode_image(x.expand(-1, 3, -1, -1), normalize=True),
        lambda ids: model.encode_text(ids, normalize=True),
        model.logit_scale,
        lambda a, b, s: clip_loss(a, b, s),
    )


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(
    enc: Encoders,
    tokenizer: Tokenizer,
    images: Tensor,
    labels: Tensor,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> list[float]:
    """AdamW, warmup + cosine; fresh captions and a one-pixel random shift every step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(enc.model.parameters(), lr=lr, weight_decay=0.05)
    # tokenize every (template, digit) caption once; a step just indexes them
    table = tokenizer([caption(t, d) for d in range(10) for t in IMAGE_TEMPLATES])
    step_ms: list[float] = []
    enc.model.train()
    for step in range(steps):
        start = time.perf_counter()
        idx = torch.randint(len(labels), (batch,), generator=g)
        x = images[idx]
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(2, 3))
        t = torch.randint(len(IMAGE_TEMPLATES), (batch,), generator=g)
        ids = table[labels[idx] * len(IMAGE_TEMPLATES) + t]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=steps // 20)
        scale = enc.log_scale.clamp(0, math.log(100)).exp()
        loss = enc.loss(enc.encode_image(x), enc.encode_text(ids), scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            enc.log_scale.clamp_(0, math.log(100))
        step_ms.append(1e3 * (time.perf_counter() - start))
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"    step {step:4d}  loss {loss.item():.3f}  scale {scale.item():.1f}")
    enc.model.eval()
    return step_ms


@torch.no_grad()
def evaluate(
    enc: Encoders, tokenizer: Tokenizer, images: Tensor, labels: Tensor, seed: int
) -> dict[str, float]:
    img = enc.encode_image(images)
    # zero-shot: prompts averaged per class (the same recipe as ZeroShotClassifier)
    prompts = tokenizer([caption(t, d) for d in range(10) for t in IMAGE_TEMPLATES])
    per_prompt = enc.encode_text(prompts).reshape(10, len(IMAGE_TEMPLATES), -1)
    classes = F.normalize(per_prompt.mean(dim=1), dim=-1)
    zero_shot = (img @ classes.T).argmax(dim=1).eq(labels).float().mean().item()
    # retrieval: one seeded caption per held-out image
    g = torch.Generator().manual_seed(seed + 123)
    t = torch.randint(len(IMAGE_TEMPLATES), (len(labels),), generator=g)
    texts = [caption(IMAGE_TEMPLATES[int(k)], int(d)) for k, d in zip(t, labels)]
    txt = enc.encode_text(tokenizer(texts))
    sim = img @ txt.T
    i2t = labels[sim.argmax(dim=1)].eq(labels).float().mean().item()
    t2i = labels[sim.argmax(dim=0)].eq(labels).float().mean().item()
    return {"zero_shot": zero_shot, "i2t": i2t, "t2i": t2i}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", choices=["bpe", "byte"], default="bpe")
    parser.add_argument(
        "--vision",
        choices=["vit", "resnet"],
        default="vit",
        help="diffkit's image tower; resnet (diffkit only) is a small GroupNorm ResNet",
    )
    parser.add_argument(
        "--libraries", nargs="+", choices=["diffkit", "open_clip"], default=["diffkit", "open_clip"]
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = Sizes(context=16 if args.tokenizer == "bpe" else 40)
    tokenizer: Tokenizer = (
        CLIPTokenizer.from_open_clip(context_length=sizes.context)
        if args.tokenizer == "bpe"
        else ByteTokenizer(sizes.context)
    )

    images, labels = load_digits(IMAGE_SIZE)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    n_test = len(labels) // 5
    test, train_idx = order[:n_test], order[n_test:]
    print(
        f"digits {IMAGE_SIZE}x{IMAGE_SIZE}: {len(train_idx)} train / {n_test} held-out images, "
        f"{len(IMAGE_TEMPLATES)} caption templates, {args.tokenizer} tokenizer "
        f"(context {sizes.context}); {args.vision} image tower; "
        f"{args.steps} steps x batch {args.batch}"
    )
    builders = {"diffkit": build_diffkit, "open_clip": build_open_clip}
    rows: dict[str, dict[str, float]] = {}
    if args.vision == "resnet" and "open_clip" in args.libraries:
        parser.error("--vision resnet has no open_clip peer; pass --libraries diffkit")
    for name in args.libraries:
        torch.manual_seed(args.seed)
        enc = builders[name](sizes, tokenizer.vocab_size, args.vision)
        params = sum(p.numel() for p in enc.model.parameters())
        print(f"  {name}: {params / 1e6:.2f}M parameters")
        start = time.perf_counter()
        step_ms = train(
            enc,
            tokenizer,
            images[train_idx],
            labels[train_idx],
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
        )
        total = time.perf_counter() - start
        rows[name] = evaluate(enc, tokenizer, images[test], labels[test], args.seed)
        rows[name] |= {"ms": statistics.median(step_ms), "total": total}

    print()
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} torch threads "
        "(shared machine: timings are noisy); held-out images only"
    )
    print()
    print(
        "| library | zero-shot acc | recall@1 image->text | recall@1 text->image "
        "| median ms / step | train time (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(
            f"| {name} | {100 * r['zero_shot']:.1f} % | {100 * r['i2t']:.1f} % | "
            f"{100 * r['t2i']:.1f} % | {r['ms']:.1f} | {r['total']:.0f} |"
        )
    if {"diffkit", "open_clip"} <= rows.keys():
        ratio = rows["diffkit"]["ms"] / rows["open_clip"]["ms"]
        print(f"\nstep time diffkit / open_clip: {ratio:.2f}x")


if __name__ == "__main__":
    main()
