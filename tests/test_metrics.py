"""Metrics by hand: predictions, per-class accuracy, AA, OA, confusion; the evaluation schedule."""
import numpy as np
import pytest
import torch

from util import metrics


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kappa_and_macro_f1_match_scikit_learn(seed):
    """Seeded random labels with ignored samples (255) and a class the predictions never hold."""
    from sklearn.metrics import cohen_kappa_score, f1_score

    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 5, 300))
    y_pred[y_pred == 4] = 0  # class "e" is true but never predicted
    y_true[rng.random(300) < 0.1] = 255
    m = metrics.classification_metrics(y_true, y_pred, list("abcdef"))
    kept = y_true != 255
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y_true[kept], y_pred[kept]))
    assert m["macro_F1"] == pytest.approx(100 * f1_score(y_true[kept], y_pred[kept], average="macro", zero_division=0))
    # the predictions on ignored samples change neither
    y_pred[~kept] = 5
    again = metrics.classification_metrics(y_true, y_pred, list("abcdef"))
    assert (again["kappa"], again["macro_F1"]) == (m["kappa"], m["macro_F1"])


def test_kappa_and_macro_f1_by_hand():
    # confusion [[2, 1], [1, 1]] (class "c" ignored): p_o = 3/5, p_e = (3*3 + 2*2)/25 = 13/25
    m = metrics.classification_metrics(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 0, 0]), ["a", "b", "c"],
                                       ignore=(255, 2))
    assert m["kappa"] == pytest.approx((3 / 5 - 13 / 25) / (1 - 13 / 25))
    assert m["macro_F1"] == pytest.approx(100 * (2 * 2 / (3 + 3) + 2 * 1 / (2 + 2)) / 2)
    one_class = metrics.classification_metrics(np.array([1, 1]), np.array([1, 1]), ["a", "b"])
    assert one_class["kappa"] is None and one_class["macro_F1"] == 100.0
    empty = metrics.classification_metrics(np.array([255]), np.array([0]), ["a", "b"])
    assert empty["kappa"] is None and empty["macro_F1"] is None
