"""Losses of synthesis and student training, as pure functions on tensors (METHOD.md 1.4, 1.6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothed_statistic(current: torch.Tensor, running: torch.Tensor | None, momentum: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Momentum-smoothed statistic with the current batch's gradient (straight-through).

    running <- m * running + (1 - m) * sg(current)   (initialised with the first value)
    value    = running + current - sg(current)      -> value of the EMA, gradient of `current`.
    Returns (smoothed statistic, new running state).
    """
    detached = current.detach()
    running = detached if running is None else momentum * running + (1 - momentum) * detached
    return running + current - detached, running


def softmax_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(p / tau) || softmax(q / tau)), summed over classes, mean over the batch."""
    log_p = F.log_softmax(p_logits / tau, dim=1)
    log_q = F.log_softmax(q_logits / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def flatness_kl(logits: torch.Tensor, ema_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Flatness term KL(softmax(z / tau) || softmax(z_ema / tau)); the EMA side carries no gradient."""
    return softmax_kl(logits, ema_logits.detach(), tau)


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor | None = None,
                       lam: float = 1.0) -> torch.Tensor:
    """Cross-entropy against CutMix-mixed hard labels: lam * CE(y) + (1 - lam) * CE(y[perm])."""
    loss = F.cross_entropy(logits, labels)
    if perm is not None and lam < 1.0:
        loss = lam * loss + (1 - lam) * F.cross_entropy(logits, labels[perm])
    return loss


def mse_ce_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                ce_weight: float = 0.025, perm: torch.Tensor | None = None, lam: float = 1.0
                ) -> torch.Tensor:
    """EDC student loss: MSE(student logits, teacher mean logits) + ce_weight * CE(student, y)."""
    return F.mse_loss(student, teacher) + ce_weight * soft_cross_entropy(student, labels, perm, lam)


def kl_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """SRe2L/RDED student loss: KL(softmax(t / T) || softmax(s / T))."""
    return softmax_kl(teacher, student, temperature)
