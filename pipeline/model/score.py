"""The box's score: how far to trust each refined box, from the evidence the cascade gathered on the way.

The score is a logistic regression on the standardised evidence (K x F: every stage's pooled net features,
each side's spread and move, and the coarse box's size), fitted by `train` on the held-out training images
with `fit_score`, never learnt by gradient steps on the images the refiner trains on: there the refiner does
better than on new images, and a score learnt there trusts it too much (on the demo a head trained alongside
the refiner ranked the boxes it made worse at AUROC 0.74, this one at 0.86; docs/experiments.md).

`fit_score` cross-fits: the held-out images are split into folds, each fold is scored by the fit on the others
(those out-of-fold logits calibrate the score and choose the abstention threshold, as new images would see it),
and the score shipped is the mean of the fold fits. The ridge strength is chosen among RIDGE_GRID by the
out-of-fold log-loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

# The score's calibration (scale, bias of its logit) before `train` fits one: the raw chance.
IDENTITY_CALIBRATION = torch.tensor([1.0, 0.0])
# Inverse ridge strengths (scikit-learn's C) tried; one step is a factor of about 3.
RIDGE_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
FOLDS = 2


class BoxScore(nn.Module):
    """K x F evidence -> K logits, and the calibrated chance that each refined box beats its coarse box.

    Every parameter is a buffer that `train` fills (`install`); until then the score is a constant 0.5.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("inverse_std", torch.ones(features))
        self.register_buffer("weight", torch.zeros(features))
        self.register_buffer("intercept", torch.zeros(()))
        self.register_buffer("calibration", IDENTITY_CALIBRATION.clone())  # scale, bias of the logit

    def forward(self, evidence: Tensor) -> Tensor:
        """K x F evidence -> K uncalibrated logits."""
        standard = (evidence.detach().float() - self.mean) * self.inverse_std
        return standard @ self.weight + self.intercept

    def probability(self, logits: Tensor) -> Tensor:
        """K logits (`forward`) -> K calibrated scores in [0, 1]."""
        scale, bias = self.calibration.unbind()
        return torch.sigmoid(logits.float() * scale + bias)

    def install(self, fit: ScoreFit, calibration: Tensor) -> None:
        """Take the fitted logistic regression and the calibration (scale, bias) of its logits."""
        for name, value in (
            ("mean", fit.mean),
            ("inverse_std", fit.inverse_std),
            ("weight", fit.weight),
            ("intercept", fit.intercept),
            ("calibration", calibration),
        ):
            getattr(self, name).copy_(value)


@dataclass(frozen=True)
class ScoreFit:
    """A fitted score (what `BoxScore.install` takes) and the out-of-fold logits of the boxes it was fitted on."""

    mean: Tensor  # F
    inverse_std: Tensor  # F
    weight: Tensor  # F, on the standardised evidence
    intercept: Tensor  # scalar
    out_of_fold: Tensor  # N: each box's logit from the fit on the other folds' images
    ridge: float | None  # the inverse ridge strength chosen (None: too few images or one outcome, constant score)


def fit_score(evidence: Tensor, better: Tensor, groups: Tensor) -> ScoreFit:
    """Cross-fit the score on N boxes: evidence N x F, better N bools (the refined box beat the coarse one),
    groups N ints (each box's image: folds never split an image, whose boxes look alike).

    With fewer than FOLDS images or only one outcome in some fold's training part there is nothing to learn:
    the score is the constant log-odds of `better` (smoothed), which `choose_min_score` turns into all or none.
    """
    from sklearn.linear_model import LogisticRegression  # imported late: only `train` fits a score
    from sklearn.model_selection import GroupKFold

    features = evidence.shape[1]
    x = evidence.double().numpy()
    y = better.bool().numpy()
    mean = x.mean(axis=0) if len(x) else np.zeros(features)
    std = x.std(axis=0) if len(x) else np.ones(features)
    inverse_std = np.where(std > 1e-8, 1.0 / np.maximum(std, 1e-8), 0.0)  # a constant feature says nothing
    standard = (x - mean) * inverse_std
    splits = (
        list(GroupKFold(n_splits=FOLDS).split(standard, y, groups.numpy()))
        if len(np.unique(groups.numpy())) >= FOLDS
        else []
    )
    if not splits or any(len(np.unique(y[train])) < 2 for train, _ in splits):
        positives = float(y.sum())
        constant = np.log((positives + 1) / (len(y) - positives + 1))
        return _fit(mean, inverse_std, np.zeros(features), constant, np.full(len(y), constant), None)
    best: tuple[float, float, list, np.ndarray] | None = None
    for ridge in RIDGE_GRID:
        models = [LogisticRegression(C=ridge, max_iter=1000).fit(standard[train], y[train]) for train, _ in splits]
        out_of_fold = np.empty(len(y))
        for (_, test), model in zip(splits, models, strict=True):
            out_of_fold[test] = model.decision_function(standard[test])
        loss = float(np.logaddexp(0.0, np.where(y, -out_of_fold, out_of_fold)).mean())
        if best is None or loss < best[0]:
            best = (loss, ridge, models, out_of_fold)
    _, ridge, models, out_of_fold = best
    weight = np.mean([m.coef_[0] for m in models], axis=0)
    intercept = float(np.mean([m.intercept_[0] for m in models]))
    return _fit(mean, inverse_std, weight, intercept, out_of_fold, ridge)


def _fit(
    mean: np.ndarray,
    inverse_std: np.ndarray,
    weight: np.ndarray,
    intercept: float,
    out_of_fold: np.ndarray,
    ridge: float | None,
) -> ScoreFit:
    def as_tensor(value: np.ndarray | float) -> Tensor:
        return torch.as_tensor(np.asarray(value), dtype=torch.float32)

    return ScoreFit(
        as_tensor(mean), as_tensor(inverse_std), as_tensor(weight), as_tensor(intercept), as_tensor(out_of_fold), ridge
    )
