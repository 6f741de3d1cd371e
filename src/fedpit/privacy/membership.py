"""Loss-based membership inference (Yeom et al. 2018) and its reference-calibrated form (the
tuned model's loss minus the base model's, after Carlini et al. 2022 "Membership Inference
Attacks From First Principles"): AUC and TPR at 1% FPR, members vs non-members of the same
distribution."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_target: float = 0.01) -> float:
    fpr, tpr, _ = roc_curve(labels, scores)
    allowed = tpr[fpr <= fpr_target]
    return float(allowed.max()) if allowed.size else 0.0


def membership_attack(
    member_losses: list[float],
    nonmember_losses: list[float],
    member_reference: list[float] | None = None,
    nonmember_reference: list[float] | None = None,
) -> dict[str, float]:
    """Higher score = "member". The raw attack scores -loss; the calibrated one -(loss - reference)."""
    if not member_losses or not nonmember_losses:
        return {}
    labels = np.array([1] * len(member_losses) + [0] * len(nonmember_losses))
    raw = -np.array(member_losses + nonmember_losses)
    figures = {"mia_loss_auc": float(roc_auc_score(labels, raw)), "mia_loss_tpr_at_1fpr": tpr_at_fpr(labels, raw)}
    if member_reference is not None and nonmember_reference is not None:
        reference = np.array(member_reference + nonmember_reference)
        calibrated = raw + reference
        figures["mia_ref_auc"] = float(roc_auc_score(labels, calibrated))
        figures["mia_ref_tpr_at_1fpr"] = tpr_at_fpr(labels, calibrated)
    return figures
