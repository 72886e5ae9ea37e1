"""The Gaussian-process model: closed-form leave-one-out, hyperparameters, b=0 handling."""

from __future__ import annotations

import numpy as np
import pytest

from nidask.errors import InputError
from nidask.estimation import gaussian_process as gp
from nidask.estimation.models import GPModel, frame_groups, get_model

RNG = np.random.default_rng(11)


def scheme(per_shell=(12, 10), bvalues=(1000.0, 2000.0), n_b0=0):
    rows = [np.zeros((n_b0, 4))]
    for n, b in zip(per_shell, bvalues, strict=True):
        dirs = RNG.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        rows.append(np.column_stack([dirs, np.full(n, b)]))
    return np.vstack(rows)


def explicit_refit(y, gradients, fold, ratio, angular, across, sigma2):
    """Fit the process (vague prior on the shell means) on all volumes but ``fold``."""
    train = np.delete(np.arange(len(y)), fold)
    unit = gp.covariance(gradients, angular, across)
    cov = sigma2 * (ratio * unit + np.eye(len(y)))
    basis = gp.mean_basis(gradients)
    k_train = cov[np.ix_(train, train)]
    h_train = basis[train]
    inverse = np.linalg.inv(k_train)
    beta = np.linalg.solve(h_train.T @ inverse @ h_train, h_train.T @ inverse @ y[train])
    k_star = sigma2 * ratio * unit[fold, train]  # signal covariance: no noise across volumes
    return k_star @ inverse @ (y[train] - h_train @ beta) + basis[fold] @ beta


def test_leave_one_out_closed_form_equals_explicit_refits():
    gradients = scheme()
    ratio, angular, across, sigma2 = 3.0, 0.9, 0.6, 2.0
    cov = sigma2 * (ratio * gp.covariance(gradients, angular, across) + np.eye(len(gradients)))
    data = RNG.multivariate_normal(np.zeros(len(gradients)), cov, size=5)
    data += gp.mean_basis(gradients) @ np.array([50.0, 20.0])
    predictions = gp.predict_all_folds(
        data, gradients, angular, across, sigma2, ratios=np.array([ratio])
    )
    for v in range(len(data)):
        for fold in range(len(gradients)):
            expected = explicit_refit(data[v], gradients, fold, ratio, angular, across, sigma2)
            assert predictions[v, fold] == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_each_voxel_takes_its_most_likely_ratio():
    """Isotropic voxels get the shell mean of the others; structured ones follow their signal."""
    gradients = scheme((20,), (1000.0,))
    flat = 100.0 + RNG.normal(0, 1.0, (1, 20))
    structured = 100.0 + 30 * (gradients[:, 0] ** 2)[None] + RNG.normal(0, 1.0, (1, 20))
    data = np.vstack([flat, structured])
    predictions = gp.predict_all_folds(data, gradients, 1.0, 1.0, 1.0)
    loo_mean = (data.sum(1, keepdims=True) - data) / 19
    np.testing.assert_allclose(predictions[0], loo_mean[0], rtol=1e-4)
    error_gp = np.abs(predictions[1] - structured[0]).mean()
    error_mean = np.abs(loo_mean[1] - structured[0]).mean()
    assert error_gp < 0.5 * error_mean


def test_hyperparameters_are_recovered_from_samples_of_the_process():
    gradients = scheme((40, 40), (1000.0, 3000.0))
    truth = (4.0, 0.8, 1.0, 3.0)
    cov = truth[3] * (truth[0] * gp.covariance(gradients, truth[1], truth[2]) + np.eye(80))
    sample = RNG.multivariate_normal(np.zeros(80), cov, size=3000)
    ratio, angular, across, sigma2 = gp.fit_hyperparameters(sample, gradients)
    assert ratio == pytest.approx(truth[0], rel=0.2)
    assert angular == pytest.approx(truth[1], rel=0.2)
    assert across == pytest.approx(truth[2], rel=0.2)
    assert sigma2 == pytest.approx(truth[3], rel=0.1)


def test_shell_labels_group_nearby_bvalues():
    assert gp.shell_labels([0, 5, 995, 1005, 2000, 3010, 2990]).tolist() == [0, 0, 1, 1, 2, 3, 3]


def test_every_shell_needs_two_volumes():
    gradients = scheme((5, 1), (1000.0, 2000.0))
    with pytest.raises(InputError, match="two volumes"):
        gp.predict_all_folds(RNG.random((3, 6)), gradients, 1.0, 1.0, 1.0)


def test_gp_model_predicts_b0_volumes_from_the_other_b0s():
    gradients = scheme((12,), (1000.0,), n_b0=3)
    data = RNG.uniform(50, 100, (30, len(gradients)))
    model = get_model("gp")
    assert isinstance(model, GPModel)
    prepared = model.prepare(data, {"gradients": gradients})
    assert prepared.hyperparameters is not None and model.hyperparameters is None
    predictions = prepared.predict_folds(data, {"gradients": gradients}, range(len(gradients)))
    b0 = data[:, :3]
    np.testing.assert_allclose(predictions[:, :3], (b0.sum(1, keepdims=True) - b0) / 2, rtol=1e-5)
    groups, reference = frame_groups({"gradients": gradients}, len(gradients))
    assert reference == 0 and groups[:3].tolist() == [0, 0, 0] and set(groups[3:]) == {1}


def test_gp_model_needs_gradients():
    with pytest.raises(InputError, match="needs a DWI"):
        GPModel().prepare(RNG.random((4, 6)), {})


def test_rows_beyond_one_row_block_are_predicted_as_in_one_block(monkeypatch):
    """Row blocks (the memory bound) change nothing: each voxel keeps its ratio and values."""
    gradients = scheme((15, 15), (1000.0, 2000.0))
    n_rows = 2 * gp.ROW_BLOCK + 37
    base = 100.0 + 30 * (gradients[:, 0] ** 2)[None] * RNG.random((n_rows, 1))
    data = (base + RNG.normal(0, 1.0, base.shape)).astype(np.float32)
    blocked = gp.predict_all_folds(data, gradients, 1.0, 1.0, 1.0)
    monkeypatch.setattr(gp, "ROW_BLOCK", n_rows)
    whole = gp.predict_all_folds(data, gradients, 1.0, 1.0, 1.0)
    np.testing.assert_array_equal(blocked, whole)
    assert not np.allclose(blocked[:100], blocked[-100:])  # rows are not all alike
