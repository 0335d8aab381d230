"""Metrics by hand: predictions, per-class accuracy, AA, OA, confusion; the evaluation schedule."""
import numpy as np
import pytest
import torch

import metrics


def test_predict_single_head_and_late_fusion():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert metrics.predict({"fused": a}).tolist() == [0, 1]
    b = torch.tensor([[0.0, 5.0], [0.0, 1.0]])  # sample 0: the confident head wins the mean probability
    assert metrics.predict({"s1": a, "s2": b}).tolist() == [1, 1]


def test_classification_metrics_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2, 255, 3])
    y_pred = np.array([0, 0, 1, 1, 0, 2, 0, 2])
    m = metrics.classification_metrics(y_true, y_pred, ["a", "b", "c", "d", "e"], ignore=(255, 3))
    assert m["per_class"] == pytest.approx({"a": 200 / 3, "b": 50.0, "c": 100.0, "e": None})
    assert "d" not in m["per_class"]
    assert m["AA"] == pytest.approx((200 / 3 + 50 + 100) / 3)
    assert m["OA"] == pytest.approx(100 * 4 / 6) and m["n"] == 6 and m["ignored"] == 2
    # rows true, columns predicted; the ignored samples (255 and class "d") counted nowhere
    assert m["confusion"] == [[2, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    empty = metrics.classification_metrics(np.array([255]), np.array([0]), ["a", "b"])
    assert empty["AA"] is None and empty["n"] == 0 and empty["ignored"] == 1


def test_eval_schedule_of_the_original_runs():
    """The original: 0-based `epoch % 10 == 0 or epoch > 79` (METER-ML; > 150 for DFC2020), and after the loop."""
    meterml = sorted(metrics.eval_schedule(121, every=10, dense_after=79))
    assert meterml == [0, 10, 20, 30, 40, 50, 60, 70] + list(range(80, 121))
    dfc = sorted(metrics.eval_schedule(201, every=10, dense_after=150))
    assert dfc == list(range(0, 151, 10)) + list(range(151, 201))
    assert sorted(metrics.eval_schedule(5, every=0)) == [4]
