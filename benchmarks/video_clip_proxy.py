"""The video demo's CLIP alone: zero-shot digit / direction on held-out clips, text separation.

    PYTHONPATH=src python benchmarks/video_clip_proxy.py --vision resnet --tag resnet
    PYTHONPATH=src python benchmarks/video_clip_proxy.py --vision vit --patch 4 --tag vit

Prints one JSON line (and appends it to --log): CLIP CPU seconds, final loss, zero-shot
[digit, direction, both] % over the 40 (digit, direction) prompts (all three caption
templates averaged, or the numeral one only), on held-out and on training clips, and
cosines of the pooled text conditioning. Used for benchmarks/RESULTS.md (video section).
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffkit import demo as D
from diffkit.nn.clip import CLIP, ResNetTowerConfig, VisionTowerConfig, ZeroShotClassifier
from diffkit_demo.datasets import DIGIT_NAMES, VIDEO_TEMPLATES

torch.set_num_threads(1)

p = argparse.ArgumentParser()
p.add_argument("--vision", default="resnet")
p.add_argument("--patch", type=int, default=4)
p.add_argument("--widths", default="32,64")
p.add_argument("--blocks", default="1,1")
p.add_argument(
    "--loss",
    default="standard",
    choices=["standard", "caption", "class"],
    help="InfoNCE targets: one-hot, uniform over same caption, or same (digit, direction)",
)
p.add_argument("--steps", type=int, default=400)
p.add_argument("--batch", type=int, default=128)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--tag", default="")
p.add_argument("--log", default="/tmp/video_clip_proxy.jsonl")
p.add_argument("--num", type=int, default=4096)
p.add_argument("--init-seed", type=int, default=0)
a = p.parse_args()

cfg = D.default_config("video")
if a.vision == "resnet":
    vis = ResNetTowerConfig(
        image_size=16,
        channels=8,
        widths=tuple(int(w) for w in a.widths.split(",")),
        blocks=tuple(int(b) for b in a.blocks.split(",")),
        norm_groups=8,
    )
else:
    vis = VisionTowerConfig(
        image_size=16, patch_size=a.patch, channels=8, width=64, layers=2, heads=4
    )
cfg = cfg.model_copy(
    update={
        "clip_train": cfg.clip_train.model_copy(
            update={"steps": a.steps, "batch_size": a.batch, "lr": a.lr}
        ),
        "seed": a.seed,
    }
)
assert isinstance(cfg, D.VideoDemoConfig)
ccfg = cfg.clip_config().model_copy(update={"vision": vis})

x, labels, captions, dirs = D._video_data(cfg, "train", a.num)
tx, tlabels, tcaps, tdirs = D._video_data(cfg, "test", 400)
directions = list(cfg.directions)
dir_id = torch.tensor([directions.index(d) for d in dirs])
tdir_id = torch.tensor([directions.index(d) for d in tdirs])
uniq = sorted(set(captions))
cap_id = torch.tensor([uniq.index(c) for c in captions])
cls_id = labels * len(directions) + dir_id

torch.manual_seed(a.init_seed)
clip = CLIP(ccfg)
tok = D._byte_tokenizer(cfg)
ids = tok(list(captions))
images = x[:, :, 0]


def loss_of(index: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
    if a.loss == "standard":
        return clip.loss(images[index], ids[index])
    img = clip.encode_image(images[index], normalize=True)
    txt = clip.encode_text(ids[index], normalize=True)
    logits = clip.scale() * img @ txt.T
    g = cap_id[index] if a.loss == "caption" else cls_id[index]
    pos = (g[:, None] == g[None, :]).float()
    tgt = pos / pos.sum(1, keepdim=True)
    return (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt)) / 2


rep = D._Reporter(D.DemoResult(task="video", out=Path("/tmp")), False, None)
t0 = time.process_time()
losses = D._fit(
    clip,
    loss_of,
    len(ids),
    cfg.clip_train,
    cfg.seed + 11,
    rep,
    "clip",
    after_step=clip.clamp_logit_scale_,
)
cpu = time.process_time() - t0
clip.eval()
res = {
    "tag": a.tag,
    "args": vars(a),
    "clip_cpu": round(cpu, 1),
    "loss": round(D._tail_mean(losses), 4),
}
with torch.no_grad():
    for split, xx, ll, kk in [
        ("test", tx, tlabels, tdir_id),
        ("train", x[:400], labels[:400], dir_id[:400]),
    ]:
        tlabels_, tdir_ = ll, kk
        for name, temps in (
            [("all3", VIDEO_TEMPLATES), ("numeral", VIDEO_TEMPLATES[:1])]
            if split == "test"
            else [("all3", VIDEO_TEMPLATES)]
        ):
            # one class per (digit, direction), named "d k", its prompts averaged
            classes = [f"{d} {k}" for d in range(10) for k in directions]
            prompt_of = [
                (
                    lambda c, t=t: t.format(
                        digit=c.split()[0],
                        direction=c.split()[1],
                        name=DIGIT_NAMES[int(c.split()[0])],
                    )
                )
                for t in temps
            ]
            classifier = ZeroShotClassifier.from_prompts(clip, tok, classes, prompt_of)
            pred = classifier.predict(xx[:, :, 0])
            pd, pk = pred // len(directions), pred % len(directions)
            res[f"zs_{split}_{name}"] = [
                round(float((pd == tlabels_).float().mean()) * 100, 1),
                round(float((pk == tdir_).float().mean()) * 100, 1),
                round(float(((pd == tlabels_) & (pk == tdir_)).float().mean()) * 100, 1),
            ]
    # text side: pooled conditioning (projected) of all 120 captions
    text = D._text_conditioner(cfg, clip)
    allc = [
        (ti, d, k, t.format(digit=d, name=DIGIT_NAMES[d], direction=k))
        for ti, t in enumerate(VIDEO_TEMPLATES)
        for d in range(10)
        for k in directions
    ]
    cond = text.condition([c[3] for c in allc])
    assert cond.pooled is not None
    P = F.normalize(cond.pooled, dim=-1)
    S = P @ P.T
    T = torch.tensor([c[0] for c in allc])
    Dg = torch.tensor([c[1] for c in allc])
    K = torch.tensor([directions.index(c[2]) for c in allc])
    off = ~torch.eye(len(allc), dtype=torch.bool)

    def m(mask: torch.Tensor) -> float:
        return round(float(S[mask & off].mean()), 3)

    res["pooled_cos_sameDigit_diffTemplate_sameDir"] = m(
        (Dg[:, None] == Dg) & (T[:, None] != T) & (K[:, None] == K)
    )
    res["pooled_cos_diffDigit_sameTemplate_sameDir"] = m(
        (Dg[:, None] != Dg) & (T[:, None] == T) & (K[:, None] == K)
    )
    res["pooled_cos_sameDigit_sameTemplate_diffDir"] = m(
        (Dg[:, None] == Dg) & (T[:, None] == T) & (K[:, None] != K)
    )
    # cross-template retrieval: name captions -> nearest numeral caption (same dir): right digit?
    q = T > 0
    ref = T == 0
    Sm = S.clone()
    Sm[:, ~ref] = -9
    Sm[(K[:, None] != K)] = -9
    nn = Sm[q].argmax(1)
    res["xtemplate_digit_nn"] = round(float((Dg[nn] == Dg[q]).float().mean()) * 100, 1)
print(json.dumps(res))
with open(a.log, "a") as f:
    f.write(json.dumps(res) + "\n")
