"""Latent decode time: diffkit's KL autoencoder vs diffusers' AutoencoderKL, same weights.

diffusers' ``AutoencoderKL`` (randomly initialised, the Stable Diffusion block layout at a
smaller width) is converted with ``dk.interop.from_diffusers``; both decode the same
scaled latents under ``torch.no_grad()`` on one thread, and the decoded images are
checked equal first. Each round decodes once with each library, back to back in
alternating order; reported are the medians of the CPU time (``time.process_time``) and
the median of the per-round ratios with its quartiles.

diffkit's decoder upsamples without forming the nearest-x2 map (``nn.layers.Upsample``:
four 2x2 phase convolutions, 4/9 of the multiply-adds of upsample-then-3x3-convolve).

    python benchmarks/vae_decode.py --rounds 9
    python benchmarks/vae_decode.py --width 64 --latent 32 --rounds 9
"""

import argparse
import statistics
import time
import warnings

import torch

import diffkit as dk

warnings.filterwarnings("ignore")


def _autoencoder(width: int, seed: int = 0) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=32, help="first block's channels")
    parser.add_argument("--latent", type=int, default=16, help="latent side (image: 8x)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    theirs = _autoencoder(args.width)
    ours = dk.interop.from_diffusers(theirs).eval()
    z = torch.randn(
        args.batch, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(1)
    )

    def decode_theirs() -> torch.Tensor:
        return theirs.decode(z / theirs.config.scaling_factor).sample

    def decode_ours() -> torch.Tensor:
        return ours.decode(z)

    with torch.no_grad():
        diff = float((decode_ours() - decode_theirs()).abs().max())
        times: dict[str, list[float]] = {"diffusers": [], "diffkit": []}
        for round_ in range(args.rounds + 1):
            order = [("diffusers", decode_theirs), ("diffkit", decode_ours)]
            for name, fn in order if round_ % 2 else order[::-1]:
                start = time.process_time()
                fn()
                if round_:
                    times[name].append(time.process_time() - start)
    ratios = [a / b for a, b in zip(times["diffkit"], times["diffusers"], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    side = 8 * args.latent
    print(
        f"AutoencoderKL decode, blocks {tuple(args.width * m for m in (1, 2, 4, 4))}, latent "
        f"({args.batch}, 4, {args.latent}, {args.latent}) -> {side}x{side}, threads "
        f"{args.threads}, torch {torch.__version__}; {args.rounds} alternating rounds, CPU time"
    )
    print(
        f"{'':<12}{'diffusers ms':>14}{'diffkit ms':>12}{'time ratio':>12}{'quartiles':>12}"
        f"{'max|diff|':>11}"
    )
    print(
        f"{'decode':<12}{1e3 * statistics.median(times['diffusers']):>14.1f}"
        f"{1e3 * statistics.median(times['diffkit']):>12.1f}{statistics.median(ratios):>12.2f}"
        f"{q1:>7.2f}-{q3:.2f}{diff:>11.1e}"
    )


if __name__ == "__main__":
    main()
