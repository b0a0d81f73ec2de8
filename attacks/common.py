"""Evaluation helpers the attacks share: predictions and accuracies on uint8 image tensors kept
on the attack device (normalized batch by batch, never reloaded)."""

from __future__ import annotations

import torch
import torch.nn as nn

from utils.data import normalize_images


class EvalSet:
    """A split held as uint8 images and labels on the attack device, with its normalization."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, device,
                 batch_size: int = 500):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Normalized float inputs of the selected samples (all when ``index`` is None)."""
        x = self.images if index is None else self.images[index]
        return normalize_images(x, self.mean, self.std)

    @torch.inference_mode()
    def predict(self, model: nn.Module, output: nn.Module,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted classes (the output's decoding rule) of the selected samples, batched."""
        model.eval()
        idx = torch.arange(len(self), device=self.device) if index is None else index
        preds = [output.predict(model(self.inputs(idx[i:i + self.batch_size])))
                 for i in range(0, len(idx), self.batch_size)]
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64,
                                                          device=self.device)

    def accuracy(self, model, output, index: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> float:
        """% of the selected samples predicted as ``labels`` (their own labels by default)."""
        idx = torch.arange(len(self), device=self.device) if index is None else index
        if len(idx) == 0:
            return float("nan")
        target = self.labels[idx] if labels is None else labels
        return 100.0 * int((self.predict(model, output, idx) == target).sum()) / len(idx)
