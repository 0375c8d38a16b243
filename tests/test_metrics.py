"""Metrics on hand-computed cases, and the Table 11 aggregation."""

import numpy as np
import pytest

from mmser.metrics import classification_report, confusion, macro_f1, table11, ua, wa


def test_hand_computed_case():
    # classes 0..3; true counts: 0 x4, 1 x2, 2 x2, 3 x2
    y_true = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 3, 3, 3]
    # recalls: 3/4, 1/2, 1/2, 2/2 -> UA = (0.75 + 0.5 + 0.5 + 1) / 4 = 0.6875
    assert ua(y_true, y_pred, 4) == pytest.approx(0.6875)
    # WA = 7 / 10
    assert wa(y_true, y_pred) == pytest.approx(0.7)
    # F1: c0 P=3/4 R=3/4 -> .75; c1 P=1/2 R=1/2 -> .5; c2 P=1 R=1/2 -> 2/3; c3 P=2/3 R=1 -> .8
    assert macro_f1(y_true, y_pred, 4) == pytest.approx((0.75 + 0.5 + 2 / 3 + 0.8) / 4)
    cm = confusion(y_true, y_pred, 4)
    assert cm.tolist() == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]]


def test_ua_differs_from_wa_under_imbalance():
    # Always predicting the majority class: WA high, UA = 1/num present classes
    y_true = [0] * 9 + [1]
    y_pred = [0] * 10
    assert wa(y_true, y_pred) == pytest.approx(0.9)
    assert ua(y_true, y_pred, 4) == pytest.approx(0.5)  # classes 2, 3 absent: not counted


def test_report_fields():
    rep = classification_report([0, 1, 2, 3], [0, 1, 2, 2], ["angry", "happy", "neutral", "sad"])
    assert rep["ua"] == pytest.approx(0.75) and rep["wa"] == pytest.approx(0.75)
    assert rep["per_class_recall"] == {"angry": 1.0, "happy": 1.0, "neutral": 1.0, "sad": 0.0}
    assert rep["support"]["sad"] == 1 and rep["n"] == 4
    with pytest.raises(ValueError, match="length mismatch"):
        classification_report([0, 1], [0], ["a", "b"])


def test_table11_population_std_and_mean_of_session_means():
    t = table11({1: [0.70, 0.72], 2: [0.80, 0.80, 0.83]})
    assert t["sessions"][1]["mean"] == pytest.approx(0.71)
    assert t["sessions"][1]["std"] == pytest.approx(0.01)  # ddof 0, not 0.01414 (ddof 1)
    assert t["sessions"][2]["std"] == pytest.approx(np.std([0.80, 0.80, 0.83]))
    assert t["average"] == pytest.approx((0.71 + 0.81) / 2)  # mean of session means
    with pytest.raises(ValueError):
        table11({1: []})
