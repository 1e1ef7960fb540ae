"""Independent judges of the demo's samples, trained on real digits only (never on samples).

[`DigitJudge`][diffkit_demo.judges.DigitJudge] says which digit an image shows;
[`VideoJudge`][diffkit_demo.judges.VideoJudge] says which digit a clip shows and which way
it moves. Both are scikit-learn support-vector classifiers, so a sample is scored by a
model that shares nothing with the one that drew it.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from diffkit_demo.datasets import DIRECTIONS, DigitsDataset

__all__ = ["DigitJudge", "VideoJudge"]


def _flat(images: Tensor) -> np.ndarray:
    """``(n, 1, h, w)`` in [-1, 1] -> ``(n, h*w)`` features in [0, 1]."""
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    return x.flatten(1).numpy()


class DigitJudge:
    """An RBF support-vector classifier trained on the real digits only (never on samples).

    It is fitted on the train split of ``DigitsDataset(size)`` and scored on the held-out
    split (``test_accuracy``); it then says which digit a generated image shows.
    """

    def __init__(self, size: int, *, seed: int = 0, test_fraction: float = 0.1) -> None:
        from sklearn.svm import SVC

        train_set = DigitsDataset(size, seed=seed, split="train", test_fraction=test_fraction)
        test_set = DigitsDataset(size, seed=seed, split="test", test_fraction=test_fraction)
        self.size = size
        self.model = SVC(C=10.0, gamma="scale")
        self.model.fit(_flat(train_set.images), train_set.labels.numpy())
        self.test_accuracy = float(
            (self.predict(test_set.images) == test_set.labels.numpy()).mean()
        )

    def predict(self, images: Tensor) -> np.ndarray:
        """Digit labels ``(n,)`` of images ``(n, 1, size, size)`` in ``[-1, 1]``."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, self.size, self.size):
            raise ValueError(
                f"DigitJudge: images must be (n, 1, {self.size}, {self.size}), got "
                f"{tuple(images.shape)}"
            )
        return np.asarray(self.model.predict(_flat(images)), dtype=np.int64)


class VideoJudge:
    """Checks a clip's digit and direction without any learned video model.

    - digit: each frame is cropped to a ``digit_size`` square around its centre of mass
      and classified by an RBF support-vector classifier trained on *real* digits pasted
      at random places on the canvas and cropped the same way (so the crop's own offsets
      are learned); the majority over frames wins;
    - direction: the displacement of the centre of mass from frame 0 to frame 1 (the
      initial direction, before any bounce), each axis counted as moving when it exceeds
      ``threshold`` pixels.

    ``test_accuracy`` is the per-frame digit accuracy on the held-out real digits.
    """

    def __init__(
        self,
        digit_size: int,
        canvas: int,
        *,
        seed: int = 0,
        test_fraction: float = 0.1,
        threshold: float = 0.4,
    ) -> None:
        from sklearn.svm import SVC

        if canvas < digit_size:
            raise ValueError(f"canvas {canvas} is smaller than digit_size {digit_size}")
        self.digit_size, self.canvas, self.threshold = digit_size, canvas, threshold
        gen = torch.Generator().manual_seed(seed + 5)
        sets = {
            split: DigitsDataset(digit_size, seed=seed, split=split, test_fraction=test_fraction)
            for split in ("train", "test")
        }
        self.model = SVC(C=10.0, gamma="scale")
        train_set = sets["train"]
        features = [_flat(self._pasted_crops(train_set.images, gen)) for _ in range(3)]
        self.model.fit(np.concatenate(features), np.tile(train_set.labels.numpy(), 3))
        test_set = sets["test"]
        found = self.model.predict(_flat(self._pasted_crops(test_set.images, gen)))
        self.test_accuracy = float((found == test_set.labels.numpy()).mean())

    def _pasted_crops(self, digits: Tensor, gen: torch.Generator) -> Tensor:
        n, d, size = digits.shape[0], self.digit_size, self.canvas
        frames = torch.full((n, 1, 1, size, size), -1.0)
        corner = torch.randint(size - d + 1, (n, 2), generator=gen)
        for i in range(n):
            r, c = int(corner[i, 0]), int(corner[i, 1])
            frames[i, 0, :, r : r + d, c : c + d] = digits[i]
        return self.crops(frames)

    @staticmethod
    def centres(videos: Tensor) -> Tensor:
        """Centre of mass ``(row, col)`` per frame, ``(n, frames, 2)``, of clips in [-1, 1]."""
        mass = ((videos.float()[:, :, 0].clamp(-1, 1) + 1) / 2) ** 2  # (n, f, h, w)
        h, w = mass.shape[-2:]
        rows = torch.arange(h, dtype=torch.float32).view(h, 1)
        cols = torch.arange(w, dtype=torch.float32).view(1, w)
        total = mass.sum(dim=(-2, -1)).clamp_min(1e-6)
        r = (mass * rows).sum(dim=(-2, -1)) / total
        c = (mass * cols).sum(dim=(-2, -1)) / total
        return torch.stack([r, c], dim=-1)

    def crops(self, videos: Tensor) -> Tensor:
        """``(n * frames, 1, d, d)`` windows centred on each frame's centre of mass."""
        n, f, _, h, w = videos.shape
        d = self.digit_size
        centres = self.centres(videos)
        out = torch.empty(n * f, 1, d, d)
        for i in range(n):
            for j in range(f):
                r0 = round(float(centres[i, j, 0]) - (d - 1) / 2)
                c0 = round(float(centres[i, j, 1]) - (d - 1) / 2)
                r0, c0 = min(max(r0, 0), h - d), min(max(c0, 0), w - d)
                out[i * f + j] = videos[i, j, :, r0 : r0 + d, c0 : c0 + d].float()
        return out

    def predict(self, videos: Tensor) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Per clip ``(n, frames, 1, h, w)``: the digit, and the (row, col) step signs."""
        n, f = videos.shape[:2]
        found = self.model.predict(_flat(self.crops(videos)))
        per_frame = np.asarray(found, dtype=np.int64).reshape(n, f)
        digits = np.array([np.bincount(row, minlength=10).argmax() for row in per_frame])
        step = self.centres(videos)[:, 1] - self.centres(videos)[:, 0]
        signs = [
            tuple(int(math.copysign(1, v)) if abs(v) > self.threshold else 0 for v in s.tolist())
            for s in step
        ]
        return digits, [(a, b) for a, b in signs]

    def score(
        self, videos: Tensor, digits: Sequence[int], directions: Sequence[str]
    ) -> dict[str, float]:
        """Fractions of clips whose digit, direction, and both, are right."""
        found_digits, found_moves = self.predict(videos)
        digit_ok = found_digits == np.asarray(digits)
        move_ok = np.array(
            [DIRECTIONS[d] == m for d, m in zip(directions, found_moves, strict=True)]
        )
        return {
            "digit_accuracy": float(digit_ok.mean()),
            "direction_accuracy": float(move_ok.mean()),
            "accuracy": float((digit_ok & move_ok).mean()),
        }
