import numpy as np
import pytest

from dermscreen.calibration import expected_calibration_error, fit_temperature, operating_points, softmax


def test_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    n, c = 4000, 5
    true_logits = rng.normal(0, 1.5, (n, c))
    labels = np.array([rng.choice(c, p=p) for p in softmax(true_logits)])
    sharpened = true_logits * 3.0  # an overconfident model: the right temperature is 3
    t = fit_temperature(sharpened, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(softmax(sharpened), labels)
    after = expected_calibration_error(softmax(sharpened, t), labels)
    assert after < before and after < 0.03


def test_ece_of_perfectly_calibrated_and_wrong():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([1, 0])) == pytest.approx(1.0)


def test_operating_points_meet_their_definitions():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    score = np.clip(0.5 * y + rng.normal(0.25, 0.2, 2000), 0, 1)
    sens_first, balanced = operating_points(score, y, 0.95)
    for op in (sens_first, balanced):
        pred = score >= op.threshold
        assert op.sensitivity == pytest.approx(pred[y == 1].mean())
        assert op.specificity == pytest.approx(1 - pred[y == 0].mean())
    assert sens_first.sensitivity >= 0.95
    assert sens_first.threshold <= balanced.threshold
    assert balanced.sensitivity + balanced.specificity >= sens_first.sensitivity + sens_first.specificity


def test_operating_points_need_both_groups():
    with pytest.raises(ValueError, match="both malignant and benign"):
        operating_points(np.array([0.1, 0.2]), np.array([1, 1]))
