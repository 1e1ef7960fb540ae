"""The video demo's space-time U-Net: what its two train-step speed-ups are worth.

    python benchmarks/video_unet_step.py --threads 2 --repeats 15

Side by side in one run, each the median of ``--repeats`` timed steps after 3 warm-ups:

1. one temporal transformer block with text cross-attention (the demo's input level: 32
   clips of 4 frame pairs at 8x8 pixels, 16 channels, 40 text tokens of 64), forward and
   backward: the clip's text read by all its pixels at once (``groups=pixels``) against a
   copy of the text per pixel (the plain way, ``groups=1``);
2. AdamW's step over the demo U-Net's parameters: the multi-tensor update
   (``foreach=True``, what ``diffkit.training`` asks for) against the per-parameter loop
   (torch's default on CPU);
3. the whole train step of the demo's U-Net (forward, backward, AdamW), batch 32.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from einops import repeat

from diffkit.builder import registry
from diffkit.nn.attention import TransformerBlock
from diffkit.protocols import Conditioning
from diffkit_demo.recipes.config import default_config


def _median(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cross_attention(repeats: int) -> tuple[float, float]:
    clips, pixels, frames = 32, 64, 4
    block = TransformerBlock(16, 1, 16, context_dim=64)
    x = torch.randn(clips * pixels, frames, 16, requires_grad=True)
    text = torch.randn(clips, 40, 64)

    def grouped() -> None:
        block(x, text, None, groups=pixels).sum().backward()

    def copied() -> None:
        block(x, repeat(text, "b m d -> (b n) m d", n=pixels)).sum().backward()

    return _median(grouped, repeats), _median(copied, repeats)


def _adamw(repeats: int) -> tuple[float, float]:
    unet = registry("denoiser").build(default_config("video").pipeline.denoiser)
    for p in unet.parameters():
        p.grad = torch.randn_like(p)
    times = []
    for foreach in (True, False):
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, foreach=foreach)
        times.append(_median(opt.step, repeats))
    return times[0], times[1]


def _train_step(repeats: int) -> float:
    unet = registry("denoiser").build(default_config("video").pipeline.denoiser)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, foreach=True)
    x, t = torch.randn(32, 8, 2, 8, 8), torch.rand(32)
    cond = Conditioning(tokens=torch.randn(32, 40, 64), pooled=torch.randn(32, 64))

    def step() -> None:
        unet(x, t, cond).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    return _median(step, repeats)


def main() -> None:
    """Print the three comparisons' medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grouped, copied = _cross_attention(args.repeats)
    print(
        f"temporal cross-attention block, fwd+bwd: grouped {1e3 * grouped:.1f} ms, a text copy "
        f"per pixel {1e3 * copied:.1f} ms, ratio {copied / grouped:.2f}x"
    )
    multi, loop = _adamw(args.repeats)
    print(
        f"AdamW step, 378 k parameters: foreach {1e3 * multi:.2f} ms, per-parameter loop "
        f"{1e3 * loop:.2f} ms, ratio {loop / multi:.2f}x"
    )
    print(f"demo U-Net train step, batch 32: {1e3 * _train_step(args.repeats):.1f} ms")


if __name__ == "__main__":
    main()
