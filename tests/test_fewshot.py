import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tats.fewshot import accuracy_with_ci, episode_loss, hausdorff_scores
from tats.model import ModelConfig, TATsModel


def brute_force_scores(support, labels, query, way, eps=0.01):
    """Reference written from the method's description with plain loops over numpy arrays."""
    support, labels, query = support.numpy(), labels.numpy(), query.numpy()
    scores = np.zeros((len(query), way))
    for c in range(way):
        proto = support[labels == c].mean(axis=0)  # token-level prototype [S, P, D]
        class_frames = np.maximum(proto, 0).mean(axis=1)  # [S, D]
        for q, tokens in enumerate(query):
            query_frames = np.maximum(tokens, 0).mean(axis=1)
            d = np.array(
                [
                    [
                        1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + eps)
                        for b in class_frames
                    ]
                    for a in query_frames
                ]
            )
            scores[q, c] = -(d.min(axis=1).sum() + d.min(axis=0).sum())
    return scores


def test_hausdorff_on_a_hand_computed_case():
    # One point, two frames, 2-d tokens. Query frames e1, e2; the class's frames e1, e1.
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    query = torch.tensor([[[e1], [e2]]])  # [Q=1, S=2, P=1, D=2]
    support = torch.tensor([[[e1], [e1]], [[e2], [e2]]])  # class 0: e1 e1, class 1: e2 e2
    scores = hausdorff_scores(support, torch.tensor([0, 1]), query, way=2, shot=1)
    near = 1 - 1 / 1.01  # d between equal unit vectors: the 0.01 sits in the denominator
    # query->class: e1 finds e1 (near), e2 finds only e1 (d = 1); class->query: e1, e1 find e1.
    expected = -((near + 1) + (near + near))
    torch.testing.assert_close(scores, torch.tensor([[expected, expected]]))


def test_prototype_is_averaged_before_relu():
    # Shots [1, -1] and [1, 1]: mean then ReLU gives [1, 0] (ReLU then mean would give [1, .5]).
    support = torch.tensor([[[[1.0, -1.0]]], [[[1.0, 1.0]]]])  # [2 shots, S=1, P=1, D=2]
    query = torch.tensor([[[[1.0, 0.0]]]])
    scores = hausdorff_scores(support, torch.tensor([0, 0]), query, way=1, shot=2)
    torch.testing.assert_close(scores, torch.tensor([[-2 * (1 - 1 / 1.01)]]))


@pytest.mark.parametrize("shot", [1, 3])
def test_hausdorff_matches_brute_force(shot):
    way, s, p, d = 4, 5, 7, 6
    g = torch.Generator().manual_seed(shot)
    labels = torch.arange(way).repeat(shot)[torch.randperm(way * shot, generator=g)]
    support = torch.randn(way * shot, s, p, d, generator=g)
    query = torch.randn(9, s, p, d, generator=g)
    scores = hausdorff_scores(support, labels, query, way, shot)
    expected = brute_force_scores(support.double(), labels, query.double(), way)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_hausdorff_rejects_unbalanced_support():
    support = torch.randn(4, 2, 3, 5)
    with pytest.raises(ValueError, match="each label"):
        hausdorff_scores(support, torch.tensor([0, 0, 0, 1]), support, way=2, shot=2)
    with pytest.raises(ValueError, match="each label"):
        hausdorff_scores(support, torch.tensor([0, 1, 2, 3]), support, way=2, shot=2)
    with pytest.raises(ValueError, match="support: expected"):
        hausdorff_scores(support, torch.tensor([0, 1, 0, 1]), support, way=3, shot=2)


def test_episode_loss_terms_and_weights():
    g = torch.Generator().manual_seed(0)
    scores, query_labels = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    logits, cls_labels = torch.randn(9, 10, generator=g), torch.randint(0, 10, (9,), generator=g)
    loss = episode_loss(
        scores, query_labels, logits, cls_labels, episode_weight=2.0, cls_weight=0.5
    )
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp[torch.arange(9), cls_labels]
    smoothed = (0.9 * nll + 0.1 * -logp.mean(dim=-1)).mean()  # the original's formula
    torch.testing.assert_close(loss.cls, smoothed)
    torch.testing.assert_close(loss.episode, F.cross_entropy(scores, query_labels))
    torch.testing.assert_close(loss.total, 2.0 * loss.episode + 0.5 * smoothed)


def test_accuracy_with_ci():
    mean, ci = accuracy_with_ci([1.0, 0.0] * 50)
    assert mean == pytest.approx(0.5) and ci == pytest.approx(1.96 * 0.5 / 10)
    mean, ci = accuracy_with_ci(torch.tensor([60.0, 80.0, 100.0]))
    assert mean == pytest.approx(80.0)
    assert ci == pytest.approx(1.96 * math.sqrt(800 / 3) / math.sqrt(3))
    assert accuracy_with_ci([0.7]) == (pytest.approx(0.7), 0.0)
    with pytest.raises(ValueError, match="no episodes"):
        accuracy_with_ci([])


def tiny_episode(way=3, shot=2, queries=2, num_classes=6, seed=0):
    cfg = ModelConfig(
        feature_dim=16, num_heads=2, num_frames=4, grid_size=4, num_classes=num_classes
    )
    g = torch.Generator().manual_seed(seed)
    n_support, n_query = way * shot, way * queries
    n = n_support + n_query
    features = torch.randn(n, 4, 4, 4, 16, generator=g)
    positions = torch.rand(n, 4, 8, 2, generator=g) * 2 - 1
    mask = torch.rand(n, 4, 8, generator=g) > 0.3
    mask[:, -1] = True  # every point exists at the last frame, as with real query frames
    episode_labels = torch.cat([torch.arange(way).repeat(shot), torch.arange(way).repeat(queries)])
    cls_labels = torch.randperm(num_classes, generator=g)[:way][episode_labels]
    return cfg, features, positions, mask, episode_labels, cls_labels, n_support


def episode_step(
    model, features, positions, mask, episode_labels, cls_labels, n_support, way, shot
):
    tokens, logits = model(features, positions, mask)
    scores = hausdorff_scores(
        tokens[:n_support], episode_labels[:n_support], tokens[n_support:], way, shot
    )
    return scores, episode_loss(scores, episode_labels[n_support:], logits, cls_labels)


def test_gradients_reach_every_parameter():
    cfg, *batch = tiny_episode()
    torch.manual_seed(0)
    model = TATsModel(cfg).train()
    _, loss = episode_step(model, *batch, way=3, shot=2)
    loss.total.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, name


def test_tiny_model_overfits_one_episode():
    cfg, *batch = tiny_episode()
    torch.manual_seed(0)
    model = TATsModel(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        scores, loss = episode_step(model, *batch, way=3, shot=2)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        first = first or loss
    features, positions, mask, episode_labels, cls_labels, n_support = batch
    assert loss.episode < 0.1 * first.episode
    assert loss.cls < 0.5 * first.cls  # the smoothed loss cannot go below ~0.42 for 6 classes
    assert (scores.argmax(dim=1) == episode_labels[n_support:]).all()
    _, logits = model.eval()(features, positions, mask)
    assert (logits.argmax(dim=1) == cls_labels).all()
