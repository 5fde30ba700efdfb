"""Held-out evaluation: accuracy and expected calibration error (ECE) against their definitions."""

import json

import numpy as np
import pytest
import torch
from digits import PREPROCESSING

from kdcache.offline.cache import CacheMeta, Preprocessing
from kdcache.offline.evaluate import evaluate, evaluate_ece, expected_calibration_error, predict


def ece_by_definition(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al. (2017), eq. 3, one bin at a time: bin m holds confidences in ((m-1)/M, m/M]."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for m in range(1, bins + 1):
        members = (confidence > (m - 1) / bins) & (confidence <= m / bins)
        if members.any():
            accuracy = (predicted[members] == labels[members]).mean()
            total += members.sum() / len(labels) * abs(accuracy - confidence[members].mean())
    return total


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_a_hand_computed_case():
    # Two samples at confidence 0.9 (one right, one wrong) and two at 0.6 (both right):
    # |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_always_sure_and_half_right_is_off_by_one_half():
    probs = np.eye(4)[[0, 1, 2, 3]]
    assert expected_calibration_error(probs, np.array([0, 1, 0, 0])) == pytest.approx(0.5)


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_matches_the_definition_on_logits_and_on_probabilities(bins):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(2000, 7))
    labels = rng.integers(0, 7, 2000)
    expected = ece_by_definition(softmax(logits), labels, bins)
    assert expected_calibration_error(logits, labels, bins) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(softmax(logits), labels, bins) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(torch.from_numpy(logits).float(), torch.from_numpy(labels), bins) == pytest.approx(expected, abs=1e-6)


def test_a_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    # Confidence exactly 2/3 with M=3 belongs to (1/3, 2/3], with the sample at 0.5: one bin,
    # accuracy 1/2, mean confidence 7/12. Were it in (2/3, 1], the two bins would give 1/2 * 1/3 + 1/2 * 1/2.
    probs = np.array([[2 / 3, 1 / 3], [0.5, 0.5]])
    labels = np.array([0, 1])
    assert expected_calibration_error(probs, labels, bins=3) == pytest.approx(abs(0.5 - 7 / 12))
    assert expected_calibration_error(probs, labels, bins=3) == pytest.approx(ece_by_definition(probs, labels, 3))


def test_labels_drawn_from_the_predictions_are_calibrated():
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(scale=2.0, size=(200_000, 5)))
    labels = (probs.cumsum(axis=1) < rng.random((len(probs), 1))).sum(axis=1)
    assert expected_calibration_error(probs, labels) < 0.01
    assert expected_calibration_error(np.log(probs) * 3, labels) > 0.1  # sharpened: over-confident


def test_rejects_what_it_cannot_score():
    with pytest.raises(ValueError, match="predictions"):
        expected_calibration_error(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="predictions"):
        expected_calibration_error(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(np.zeros((3, 2)), np.zeros(3), bins=0)


def test_the_model_helpers_agree_with_the_logits():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4)).train()
    meta = CacheMeta("0" * 64, "t", 4, (2, 3), "uint8", Preprocessing(scale=1 / 255))
    inputs = torch.randint(0, 256, (50, 2, 3), dtype=torch.uint8)
    labels = torch.randint(0, 4, (50,))
    cpu = torch.device("cpu")
    with torch.no_grad():
        logits = model(inputs.float() / 255)
    torch.testing.assert_close(predict(model, inputs, meta, cpu, batch_size=7), logits)
    assert model.training  # left as it was
    assert evaluate(model, inputs, labels, meta, cpu) == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert evaluate_ece(model, inputs, labels, meta, cpu, batch_size=16) == pytest.approx(
        ece_by_definition(softmax(logits.numpy()), labels.numpy())
    )


def test_the_trainer_reports_the_eval_ece_of_each_epoch(digits_files, tmp_path):
    from kdcache.offline import models
    from kdcache.offline.train import TrainConfig, train

    out = tmp_path / "run"
    config = TrainConfig(
        caches=[str(digits_files["cache"])], student="mlp-small", epochs=2, eval_path=str(digits_files["eval"]), out=str(out),
        progress=False, export=False,
    )  # fmt: skip
    train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [0 < r["eval_ece"] < 1 for r in records] == [True, True]
    record = torch.load(out / "student.pt", weights_only=True)
    student = models.build(record["arch"], record["input_shape"], record["num_classes"])
    student.load_state_dict(record["state_dict"])
    data = np.load(digits_files["eval"])
    meta = CacheMeta("0" * 64, "t", 10, (8, 8), "uint8", PREPROCESSING)
    ece = evaluate_ece(student, torch.from_numpy(data["inputs"]), torch.from_numpy(data["labels"]), meta, torch.device("cpu"))
    assert records[-1]["eval_ece"] == pytest.approx(ece)


def test_an_npz_eval_set_without_the_channel_axis_is_fitted_as_other_sources_are(tmp_path):
    from kdcache.offline.cache import CacheError
    from kdcache.offline.evaluate import load_eval_set

    meta = CacheMeta("f" * 64, "t", 3, (1, 4, 4), "uint8", PREPROCESSING)
    inputs = np.arange(2 * 16, dtype=np.uint8).reshape(2, 4, 4)
    np.savez(tmp_path / "eval.npz", inputs=inputs, labels=np.array([0, 2]))
    x, y = load_eval_set(str(tmp_path / "eval.npz"), meta)
    assert x.shape == (2, 1, 4, 4) and np.array_equal(x.numpy()[:, 0], inputs) and y.tolist() == [0, 2]
    np.savez(tmp_path / "wrong.npz", inputs=inputs.reshape(2, 2, 8), labels=np.array([0, 2]))
    with pytest.raises(CacheError, match=r"wrong\.npz: inputs have sample shape \[2, 8\], the teacher takes \[1, 4, 4\]"):
        load_eval_set(str(tmp_path / "wrong.npz"), meta)
