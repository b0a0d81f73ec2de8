"""Attack objectives over the decoded class scores: what an attacker who knows the output head
optimises (docs/algorithms.md section 14).

The papers' attacks on an OCM model minimise (T-BFA) or maximise (BFA) the training loss, the L1
distance of the tanh outputs to a codeword; the prediction, however, is the class whose codeword
correlates best with the outputs. :class:`DecodedObjective` puts the attack loss on those
correlations, the class scores the prediction takes the argmax of:

    s_c = g(z) . S_c      (g = tanh: the outputs the model emits; g = identity: ``preact``)

with ``z`` the final layer's pre-activation outputs and ``S_c`` class ``c``'s codeword. On a
softmax model the scores are the logits. Two losses over the scores:

- ``ce``: cross-entropy ``-log softmax(s)[y]`` (TA-LBF's and the T-BFA papers' loss form, on
  the decision's scores);
- ``margin``: with ``m = max_{c != y} s_c - s_y`` (positive: misclassified), the targeted form
  ``relu(m + kappa)`` (TA-LBF Eq. 5: zero once ``y`` wins by ``kappa``; T-BFA minimises it with
  ``y`` the target on D_src and the true class on D_aux) and the untargeted form
  ``min(m, kappa)`` (BFA maximises it: a sample stops counting once it is misclassified by
  ``kappa``), so that no flip is spent on a sample that is already decided.

``scores="preact"`` differentiates through ``z`` instead of ``tanh(z)``: where an output
saturates (``|z|`` large, ``tanh' ~ 0``) the paper losses and the ``tanh`` scores pass almost no
gradient, and the bit search's first-order ranking sees nothing to gain there. The model is set
to emit ``z`` (its ``output_act`` becomes ``"linear"`` for the attack's lifetime) and the
objective applies tanh itself wherever the model's decision is needed, so predictions, ASR and
accuracies are the model's own.

The objective offers the output interface the attacks use (``loss``, ``predict``, ``scores``,
``num_classes``, ``is_ocm``, ``codebook``), so T-BFA and BFA run on it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("ce", "margin")
SCORES = ("tanh", "preact")


def other_best(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``max_{c != y} s_c`` per row."""
    masked = scores.masked_fill(F.one_hot(labels, scores.shape[1]).bool(), float("-inf"))
    return masked.max(dim=1).values


def margin(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``m = max_{c != y} s_c - s_y`` per row: positive when the row is not classified ``y``."""
    return other_best(scores, labels) - scores.gather(1, labels.view(-1, 1)).view(-1)


class DecodedObjective(nn.Module):
    """The attack loss over the decoded class scores of ``output``'s head (module docstring).

    Args:
        output: the model's output interface (:class:`models.ocm.OutputCodeMatching` or
            :class:`models.ocm.SoftmaxOutput`).
        loss: ``ce`` or ``margin``.
        scores: ``tanh`` (the emitted outputs) or ``preact`` (``z``; needs
            :meth:`emit_preactivation` on the model).
        kappa: the margin, in score units (correlation units on an OCM model).
        untargeted: the margin's untargeted form ``min(m, kappa)`` (the attack maximises it).
    """

    def __init__(self, output: nn.Module, loss: str = "ce", scores: str = "tanh",
                 kappa: float = 1.0, untargeted: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if scores not in SCORES:
            raise ValueError(f"scores must be one of {', '.join(SCORES)}, got {scores!r}")
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not kappa >= 0:
            raise ValueError(f"kappa must be a number of at least 0, got {kappa!r}")
        self.head = output
        self.loss_name, self.scores_name = loss, scores
        self.kappa, self.untargeted = float(kappa), untargeted
        # True once the model emits z: then tanh is applied here (OCM models only)
        self.emits_preactivation = False

    # -- the output interface of the attacks ---------------------------------------------------
    @property
    def is_ocm(self) -> bool:
        return bool(getattr(self.head, "is_ocm", False))

    @property
    def is_head_loss(self) -> bool:
        """Whether this objective is the head's own training loss: cross-entropy over the
        logits of a softmax model (nothing decoded, nothing saturated), the papers' loss."""
        return not self.is_ocm and self.loss_name == "ce"

    @property
    def codebook(self) -> torch.Tensor:
        return self.head.codebook

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def activated(self, outputs: torch.Tensor) -> torch.Tensor:
        """The outputs the model's decision reads (tanh of ``z`` when the model emits ``z``)."""
        return torch.tanh(outputs) if self.emits_preactivation else outputs

    def class_scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """``s_c``: correlations with every codeword (OCM), the logits otherwise."""
        if not self.is_ocm:
            return outputs
        g = outputs if self.scores_name == "preact" else self.activated(outputs)
        return g @ self.head.codebook.t()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        s = self.class_scores(outputs)
        if self.loss_name == "ce":
            per = F.cross_entropy(s, targets, reduction="none")
        elif self.untargeted:
            per = margin(s, targets).clamp(max=self.kappa)
        else:
            per = F.relu(margin(s, targets) + self.kappa)
        if reduction == "none":
            return per
        return per.mean() if reduction == "mean" else per.sum()

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.head.scores(self.activated(outputs))

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """The model's own decision (its head's rule on the emitted outputs)."""
        return self.head.predict(self.activated(outputs))

    # -- the model -----------------------------------------------------------------------------
    def emit_preactivation(self, model: nn.Module) -> None:
        """Make ``model`` (a tanh-output network) return ``z`` for the attack's lifetime; this
        objective applies tanh where the decision needs it. Nothing changes for ``tanh``
        scores or a model without a tanh output."""
        if self.scores_name != "preact" or getattr(model, "output_act", "linear") != "tanh":
            return
        model.output_act = "linear"
        self.emits_preactivation = True

    def to_dict(self) -> dict:
        return {"loss": self.loss_name, "scores": self.scores_name, "kappa": self.kappa}


def adaptive_objective(target, untargeted: bool = False, **params) -> DecodedObjective:
    """The decoded-score objective of ``params`` on ``target``'s head; with ``scores=preact``
    the target's model is set to emit pre-activation outputs (refused for a deployed torch.ao
    model, which always applies tanh)."""
    objective = DecodedObjective(target.output, untargeted=untargeted, **params)
    if objective.scores_name == "preact" and target.number_format == "torch-int8":
        raise ValueError("scores=preact needs the attacked model itself to emit its outputs: "
                         "use scores=tanh with the torch-int8 format")
    objective.emit_preactivation(target.model)
    return objective
