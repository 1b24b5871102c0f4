"""The three RDCD loss terms and the FIFO queues they read.

Notation: `z` are L2-normalised student descriptors (d-dim), `k` the momentum student's
descriptors of the other view, `Q` a FIFO queue of past momentum keys, `h_s` the student's 512-d
projection, `h_t` the teacher's 512-d descriptor, `M` a FIFO memory of past teacher descriptors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureQueue(nn.Module):
    """A FIFO ring buffer of unit vectors, initialised with random unit vectors (as in MoCo),
    kept as a buffer so it moves with the module and is saved in its state dict."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        init = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("items", init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.items.shape[0]

    @torch.no_grad()
    def enqueue(self, batch: torch.Tensor) -> None:
        """Overwrite the oldest entries with `batch` (wrapping around the end)."""
        batch = batch.detach().to(self.items.dtype)
        n = batch.shape[0]
        if n > self.size:
            batch, n = batch[-self.size :], self.size
        start = int(self.ptr)
        idx = (torch.arange(n, device=self.items.device) + start) % self.size
        self.items[idx] = batch
        self.ptr.fill_((start + n) % self.size)


def contrastive_loss(z: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float = 0.07):
    """MoCo-v2 InfoNCE: logits = [z_i·k_i, z_i·Q_j] / t, cross-entropy with the positive at 0.

    L_con = -mean_i log( exp(z_i·k_i / t) / (exp(z_i·k_i / t) + sum_j exp(z_i·Q_j / t)) )
    """
    pos = (z * k).sum(dim=1, keepdim=True)
    neg = z @ queue.T
    logits = torch.cat([pos, neg], dim=1) / t
    labels = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    return F.cross_entropy(logits, labels)


def hard_negative_loss(z: torch.Tensor, queue: torch.Tensor, floor: float = 1e-3):
    """Push each descriptor away from its most similar queue entry.

    L_hn = -mean_i log( clamp(1 - max_j z_i·Q_j, min=floor) )
    """
    hardest = (z @ queue.T).max(dim=1).values
    return -torch.log(torch.clamp(1.0 - hardest, min=floor)).mean()


def relational_loss(h_s: torch.Tensor, h_t: torch.Tensor, memory: torch.Tensor, t: float = 0.04):
    """Match the student's similarity distribution over the teacher memory to the teacher's.

    p_T = softmax(norm(h_t)·M / t), p_S = softmax(norm(h_s)·M / t),
    L_rel = mean_i KL(p_T,i || p_S,i) = mean_i sum_j p_T,ij (log p_T,ij - log p_S,ij)
    """
    log_p_t = F.log_softmax(F.normalize(h_t, dim=1) @ memory.T / t, dim=1)
    log_p_s = F.log_softmax(F.normalize(h_s, dim=1) @ memory.T / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def feature_loss(h_s: torch.Tensor, h_t: torch.Tensor):
    """Direct feature distillation (not in the RDCD paper; off by default): the student's 512-d
    feature must point where the teacher's descriptor of the same view points.

    L_feat = mean_i (1 - cos(h_s,i, h_t,i))

    Why it exists: L_rel compares a view to a memory of *unrelated* images, whose teacher
    similarities carry little signal until the memory is large (65,536 in the paper); on a few
    thousand CPU steps the student could not learn from it. Regressing onto the teacher's
    descriptor of each augmented view hands over the teacher's invariances image by image.
    """
    return (1.0 - F.cosine_similarity(h_s, h_t, dim=1)).mean()


def cross_view_loss(z: torch.Tensor, memory: torch.Tensor, own: torch.Tensor,
                    t: float) -> torch.Tensor:  # fmt: skip
    """InfoNCE between the two halves of `z` (row i of each half: views of one image), both
    directions; the negatives are the other images of the batch and the `memory` entries not
    marked in `own` [half, M] (the memory's views of the same image are no negatives)."""
    a, b = z.chunk(2)
    pos = torch.arange(len(a))
    mem_a = (a @ memory.T).masked_fill(own, float("-inf"))
    mem_b = (b @ memory.T).masked_fill(own, float("-inf"))
    la = torch.cat([a @ b.T, mem_a], dim=1) / t
    lb = torch.cat([b @ a.T, mem_b], dim=1) / t
    return 0.5 * (F.cross_entropy(la, pos) + F.cross_entropy(lb, pos))


def koleo_loss(z: torch.Tensor, same: torch.Tensor, others: torch.Tensor | None = None,
               eps: float = 1e-8) -> torch.Tensor:  # fmt: skip
    """Kozachenko-Leonenko entropy estimate of the (L2-normalised) descriptors, negated:
    -mean_i log(distance from z_i to its nearest neighbour), over the rest of the batch except
    the rows marked in `same` [B, B] (views of the same image are no neighbours) and, when given,
    the rows of `others` (fixed descriptors, e.g. the teacher memory, [B, M] mask in `same`'s
    last M columns). SSCD adds it to InfoNCE to spread descriptors uniformly: the nearest
    unrelated image then scores low, so one global score threshold works for every query (its
    µAP depends on that), where InfoNCE alone only orders each query's candidates."""
    cand = z if others is None else torch.cat([z, others])
    sim = z @ cand.T
    n = len(z)
    blocked = same.clone()
    blocked[:, :n] |= torch.eye(n, dtype=torch.bool, device=z.device)
    nearest = sim.masked_fill(blocked, float("-inf")).max(dim=1).values
    dist = (2.0 - 2.0 * nearest).clamp_min(0.0).add(eps).sqrt()
    return -torch.log(dist + eps).mean()
