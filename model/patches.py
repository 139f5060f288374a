"""Camera frames as model patches: RGB uint8 -> the (G, P) float patches one frame's grid holds.

Numpy and OpenCV only (no torch), so the server process can patchify frames before they cross to
the engine process. This module knows nothing about positions, caches or sessions.
"""

from __future__ import annotations

import cv2
import numpy as np

from .config import ModelConfig


def image_patches(image: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (grid*grid, 3*p*p) float32 in [0, 1], row-major patches."""
    size, p = cfg.image_size, cfg.patch_size
    img = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    g = size // p
    patches = img.reshape(g, p, g, p, 3).transpose(0, 2, 4, 1, 3)  # (g, g, 3, p, p)
    return np.ascontiguousarray(patches.reshape(g * g, 3 * p * p))
