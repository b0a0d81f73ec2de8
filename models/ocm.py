"""Output code matching (OCM, Ozdenizci & Legenstein, CVPR 2022) and the plain softmax output.

docs/algorithms.md section 3. An OCM network ends in ``L`` tanh outputs and is trained to match the class's
bit string ``S_y`` in {-1, +1}^L (rows of a Sylvester Hadamard matrix) under an L1 loss; a
prediction picks the class whose code correlates best with the output.

Both output types share one small interface, used by training, evaluation and the attacks:
``loss(outputs, targets)``, ``scores(outputs)`` (higher = more likely; for top-k) and
``predict(outputs)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LEGACY_SEED = 1  # the seed the published OCM checkpoints' codebooks were drawn with


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def check_code_length(code_length: int, num_classes: int) -> None:
    """Raise ValueError unless ``code_length`` is a power of two with ``L - 1 >= C``."""
    if not is_power_of_two(code_length) or code_length < 2:
        raise ValueError(f"OCM code length must be a power of two (16, 64, 1024, ...), "
                         f"got {code_length}")
    if code_length - 1 < num_classes:
        raise ValueError(f"OCM code length {code_length} is too short for {num_classes} classes: "
                         f"it must be at least classes + 1 (use {_next_power_of_two(num_classes + 1)})")


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def hadamard(order: int) -> np.ndarray:
    """Sylvester Hadamard matrix: ``H2 = [[1,1],[1,-1]]``, ``H2k = [[H,H],[H,-H]]`` (float32)."""
    if not is_power_of_two(order):
        raise ValueError(f"Hadamard order must be a power of two, got {order}")
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < order:
        h = np.block([[h, h], [h, -h]])
    return h


def make_codebook(num_classes: int, code_length: int, seed: int = LEGACY_SEED) -> torch.Tensor:
    """Codebook ``[C, L]`` in {-1, +1}: Hadamard rows without the all-ones row, shuffled.

    The shuffle is the exact legacy procedure of the public code (docs/algorithms.md section 3):
    ``np.random.seed(seed)`` then ``np.random.shuffle`` of the float32 rows, so ``seed=1``
    re-creates the codebooks of the published checkpoints. It reseeds NumPy's global generator
    (as the public code did); the generator's previous state is restored afterwards.
    """
    check_code_length(code_length, num_classes)
    rows = hadamard(code_length)[1:]
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        np.random.shuffle(rows)
    finally:
        np.random.set_state(saved)
    return torch.from_numpy(np.ascontiguousarray(rows[:num_classes]))


class SoftmaxOutput(nn.Module):
    """Vanilla output: logits, softmax cross-entropy, argmax."""

    is_ocm = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        return F.cross_entropy(outputs, targets, reduction=reduction)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Argmax; a row with a NaN (a weight flipped to inf or NaN) predicts no class (-1)."""
        return no_class_where_nan(outputs.argmax(dim=1), outputs)


def no_class_where_nan(predictions: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``predictions`` with -1 (no class: always a misclassification) where the output row holds
    a NaN, as a float model does after a flip to inf or NaN (docs/algorithms.md section 1b)."""
    return predictions.masked_fill(outputs.isnan().any(dim=1), -1)


class OutputCodeMatching(nn.Module):
    """OCM output: L1 loss to the class code, correlation decoding (docs/algorithms.md section 3).

    ``codebook`` is a ``[C, L]`` tensor in {-1, +1}; build it with :func:`make_codebook`.
    It is a non-persistent buffer: checkpoints store it beside the state dict, so that the
    model's state dict keeps the published layout.
    """

    is_ocm = True

    def __init__(self, codebook: torch.Tensor):
        super().__init__()
        codebook = torch.as_tensor(codebook, dtype=torch.float32)
        if codebook.dim() != 2 or not bool(((codebook == 1) | (codebook == -1)).all()):
            raise ValueError("an OCM codebook is a [classes, code_length] tensor of +1/-1")
        self.register_buffer("codebook", codebook, persistent=False)

    @classmethod
    def from_seed(cls, num_classes: int, code_length: int, seed: int = LEGACY_SEED):
        return cls(make_codebook(num_classes, code_length, seed))

    @property
    def num_classes(self) -> int:
        return self.codebook.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.codebook.shape[1]

    def codes(self, targets: torch.Tensor) -> torch.Tensor:
        return self.codebook[targets]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        """Mean absolute error to the target codes (PyTorch ``L1Loss``: mean over batch and bits)."""
        per_bit = (outputs - self.codebook[targets]).abs()
        if reduction == "none":
            return per_bit.mean(dim=1)
        return per_bit.mean() if reduction == "mean" else per_bit.mean(dim=1).sum()

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """``log(relu(z . S_c) + 1e-6)`` per class (docs/algorithms.md section 3)."""
        return torch.log(F.relu(outputs @ self.codebook.t()) + 1e-6)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Argmax of :meth:`scores`, ties to the lowest class index.

        *quirk* (public code): when every correlation is <= 0 all scores equal log(1e-6) and the
        prediction is class 0. A row with a NaN (a weight flipped to inf or NaN) predicts no
        class (-1): a misclassification, whatever the argmax of NaNs would say.
        """
        return no_class_where_nan(self.scores(outputs).argmax(dim=1), outputs)


def build_output(num_classes: int, ocm: bool = False, code_length: int | None = None,
                 codebook: torch.Tensor | None = None, seed: int = LEGACY_SEED) -> nn.Module:
    """The output interface of a model: :class:`SoftmaxOutput` or :class:`OutputCodeMatching`."""
    if not ocm:
        return SoftmaxOutput(num_classes)
    if codebook is not None:
        return OutputCodeMatching(codebook)
    return OutputCodeMatching.from_seed(num_classes, code_length, seed)
