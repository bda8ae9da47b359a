"""t-SNE of encoders' test-set features (the paper's Figure 4): do classes separate in the representation?

Features are the clean (`normal`) BN branch's, L2-normalised, of the first `n` test images (the evaluation's
split: `finetune.dataset` or the pretraining data), embedded by scikit-learn's Barnes-Hut t-SNE,
PCA-initialised and seeded, so a rerun draws the same picture.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .cluster.features import extract_features, load_fpre
from .config import Config
from .data.loader import subset
from .data.source import finetune_data, image_source

TSNE = "tsne.png"


def test_features(checkpoint: str | Path, cfg: Config, n: int, device: torch.device | str = "cpu"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(features [m, D], classes [m]) of the first m = min(n, test size) test images under `checkpoint`."""
    encoder, _ = load_fpre(checkpoint, device)
    source = image_source(finetune_data(cfg, "test", cfg.eval.beton))
    classes: list[int] = []
    features = extract_features(encoder, subset(source, range(min(n, len(source)))), cfg.eval.batch_size,
                                cfg.views.size, device, classes)
    return features.cpu().numpy(), np.asarray(classes)


def embed(features: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE coordinates of the rows of `features`."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(features) - 1) / 3)  # scikit-learn needs perplexity < n
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def tsne_panels(checkpoints: list[tuple[str, Path]], cfg: Config, n: int, seed: int = 0,
                device: torch.device | str = "cpu") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, t-SNE points, classes) per (label, pretraining checkpoint), for figures.plot_tsne."""
    panels = []
    for label, path in checkpoints:
        features, classes = test_features(path, cfg, n, device)
        panels.append((label, embed(features, seed), classes))
    return panels
