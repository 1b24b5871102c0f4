"""Each RDCD loss against a value computed by hand, and the FIFO queue."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rdcd.losses import (
    FeatureQueue,
    contrastive_loss,
    feature_loss,
    hard_negative_loss,
    relational_loss,
)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_contrastive_equals_hand_cross_entropy():
    z, k, q = _unit(3, 8, seed=1), _unit(3, 8, seed=2), _unit(5, 8, seed=3)
    expect = 0.0
    for i in range(3):
        pos = math.exp(float(z[i] @ k[i]) / 0.07)
        neg = sum(math.exp(float(z[i] @ q[j]) / 0.07) for j in range(5))
        expect += -math.log(pos / (pos + neg))
    assert math.isclose(float(contrastive_loss(z, k, q)), expect / 3, rel_tol=1e-4)


def test_contrastive_is_small_when_positive_dominates():
    z = _unit(4, 16, seed=1)
    far = -z[:1].repeat(6, 1)  # queue entries opposite to the first query
    assert float(contrastive_loss(z[:1], z[:1], far)) < 1e-6


def test_hard_negative_hand_value_and_clamp():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    # row 0: max sim 1.0 -> clamp to 1e-3; row 1: max sim 0.8 -> 1 - 0.8 = 0.2
    expect = -(math.log(1e-3) + math.log(0.2)) / 2
    assert math.isclose(float(hard_negative_loss(z, q)), expect, rel_tol=1e-5)


def test_relational_zero_when_student_matches_teacher():
    h_t, mem = _unit(4, 512, seed=1), _unit(64, 512, seed=2)
    assert abs(float(relational_loss(3.0 * h_t, h_t, mem))) < 1e-6  # scale does not matter
    assert float(relational_loss(_unit(4, 512, seed=9), h_t, mem)) > 0.01


def test_relational_hand_value():
    h_s, h_t, mem = _unit(2, 4, seed=4), _unit(2, 4, seed=5), _unit(3, 4, seed=6)
    total = 0.0
    for i in range(2):
        pt = torch.softmax(h_t[i] @ mem.T / 0.04, 0)
        ps = torch.softmax(h_s[i] @ mem.T / 0.04, 0)
        total += float((pt * (pt.log() - ps.log())).sum())
    assert math.isclose(float(relational_loss(h_s, h_t, mem)), total / 2, rel_tol=1e-4)


def test_losses_carry_gradients_to_the_student_only():
    z = _unit(2, 8, seed=1).requires_grad_()
    k, q = _unit(2, 8, seed=2), _unit(4, 8, seed=3)
    (contrastive_loss(z, k, q) + hard_negative_loss(z, q)).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_queue_fifo_and_wraparound():
    queue = FeatureQueue(size=5, dim=2)
    assert queue.items.shape == (5, 2) and torch.allclose(queue.items.norm(dim=1), torch.ones(5))
    queue.enqueue(torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
    assert int(queue.ptr) == 3 and queue.items[:3, 0].tolist() == [1, 2, 3]
    queue.enqueue(torch.tensor([[4.0, 0], [5, 0], [6, 0]]))  # wraps: 6 overwrites the oldest
    assert int(queue.ptr) == 1
    assert queue.items[:, 0].tolist() == [6, 2, 3, 4, 5]
    queue.enqueue(torch.arange(14.0).view(7, 2))  # larger than the queue: keeps the newest 5
    assert sorted(queue.items[:, 0].tolist()) == [4, 6, 8, 10, 12]
    state = queue.state_dict()
    assert set(state) == {"items", "ptr"}


def test_feature_loss_hand_values():
    t = _unit(4, 8, seed=5)
    assert float(feature_loss(t * 3.0, t)) < 1e-6  # scale-free: only the direction counts
    assert math.isclose(float(feature_loss(-t, t)), 2.0, rel_tol=1e-5)
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert math.isclose(float(feature_loss(a, b)), (1.0 + (1 - 1 / math.sqrt(2))) / 2, rel_tol=1e-5)
