"""Models and the leave-one-out machinery: voxel-major layout, fold sweeps, fold orders."""

from __future__ import annotations

import numpy as np
import pytest

import nidask
from nidask.estimation.lofo import (
    fold_order,
    mask_index,
    read_column,
    read_rows,
    row_blocks,
    scatter,
    sweep_predictions,
    write_voxel_major,
)
from nidask.estimation.models import (
    AverageModel,
    B0Model,
    CallableModel,
    DTIModel,
    TemporalModel,
    get_model,
    leave_one_out_medians,
    predict_folds,
    predict_folds_by_fitting,
    tensor_design,
)

RNG = np.random.default_rng(7)


def two_shell_gradients(n=12):
    dirs = RNG.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.where(np.arange(n) < n // 2, 1000.0, 2000.0)
    return np.column_stack([dirs, bvals])


def test_average_model_is_the_mean_of_the_other_volumes_of_the_shell():
    data = RNG.random((40, 12)).astype(np.float32)
    grads = two_shell_gradients()
    predictions = AverageModel().predict_folds(data, {"gradients": grads}, range(12))
    for fold in range(12):
        shell = np.flatnonzero(grads[:, 3] == grads[fold, 3])
        others = shell[shell != fold]
        np.testing.assert_allclose(predictions[:, fold], data[:, others].mean(1), rtol=1e-5)


def test_average_model_without_shells_pools_every_other_volume():
    data = RNG.random((30, 7)).astype(np.float32)
    predictions = AverageModel(per_shell=False).predict_folds(data, {}, range(7))
    expected = (data.sum(1, keepdims=True) - data) / 6
    np.testing.assert_allclose(predictions, expected, rtol=1e-5)


def test_median_model_is_the_median_of_the_others():
    data = RNG.random((30, 9)).astype(np.float32)
    predictions = get_model("median").predict_folds(data, {}, range(9))
    for fold in range(9):
        np.testing.assert_allclose(predictions[:, fold], np.median(np.delete(data, fold, 1), 1))


@pytest.mark.parametrize("m", [2, 3, 4, 7, 10])
def test_leave_one_out_medians_match_numpy(m):
    """One sort per row gives every column's leave-one-out median exactly (ties too)."""
    values = RNG.integers(0, 5, (40, m)).astype(np.float32)  # many ties
    expected = np.stack([np.median(np.delete(values, j, 1), 1) for j in range(m)], 1)
    np.testing.assert_array_equal(leave_one_out_medians(values), expected)


def test_median_model_per_shell_for_some_folds():
    grads = two_shell_gradients(12)
    data = RNG.uniform(100, 1000, (20, 12)).astype(np.float32)
    folds = [11, 0, 5, 6]
    predictions = AverageModel("median").predict_folds(data, {"gradients": grads}, folds)
    for j, fold in enumerate(folds):
        shell = np.flatnonzero(np.abs(grads[:, 3] - grads[fold, 3]) <= 100)
        others = shell[shell != fold]
        np.testing.assert_array_equal(predictions[:, j], np.median(data[:, others], 1))


def test_dti_model_predicts_tensor_data_exactly():
    grads = two_shell_gradients(14)
    s0 = RNG.uniform(500, 1000, 25)
    tensors = RNG.uniform(0.2e-3, 1e-3, (25, 6)) * [1, 1, 1, 0.1, 0.1, 0.1]
    data = (s0[:, None] * np.exp(tensors @ tensor_design(grads).T)).astype(np.float32)
    predictions = DTIModel().predict_folds(data, {"gradients": grads, "bzero": s0}, range(14))
    np.testing.assert_allclose(predictions, data, rtol=1e-3)
    free = DTIModel().predict_folds(data, {"gradients": grads}, range(14))
    np.testing.assert_allclose(free, data, rtol=1e-3)


def test_temporal_model_recovers_a_cubic_time_activity_curve():
    times = np.cumsum(RNG.uniform(20, 60, 10))
    coef = RNG.normal(size=(15, 4))
    scaled = 2 * (times - times.min()) / (times.max() - times.min()) - 1
    data = coef @ np.vander(scaled, 4, increasing=True).T
    predictions = TemporalModel().predict_folds(data, {"midframe": times}, range(1, 9))
    np.testing.assert_allclose(predictions, data[:, 1:9], atol=1e-6)
    linear = TemporalModel(degree=None).predict_folds(data, {"midframe": times}, [4])
    w = (times[4] - times[3]) / (times[5] - times[3])
    np.testing.assert_allclose(linear[:, 0], (1 - w) * data[:, 3] + w * data[:, 5], rtol=1e-5)


@pytest.mark.parametrize(
    "model, meta",
    [
        (AverageModel(), "dwi"),
        (AverageModel("median"), "dwi"),
        (TemporalModel(), "pet"),
        (TemporalModel(degree=None), "pet"),
        (B0Model(), "dwi"),
    ],
)
def test_all_fold_fast_paths_match_fitting_each_fold(model, meta):
    data = RNG.uniform(100, 1000, (50, 12)).astype(np.float32)
    if meta == "dwi":
        meta = {"gradients": two_shell_gradients(), "bzero": RNG.uniform(900, 1500, 50)}
    else:
        meta = {"midframe": np.cumsum(RNG.uniform(10, 50, 12))}
    fast = model.predict_folds(data, meta, range(12))
    slow = predict_folds_by_fitting(model, data, meta, range(12))
    np.testing.assert_allclose(fast, slow, rtol=1e-4)


def test_dti_leave_one_out_equals_weighted_refits():
    """The leverage shortcut equals refitting each fold with the full fit's weights."""
    from nidask.estimation.models import _weighted_fit

    gradients = np.vstack([np.zeros((2, 4)), two_shell_gradients(14)])
    data = RNG.uniform(100, 1000, (20, 16))
    predictions = DTIModel().predict_folds(data, {"gradients": gradients}, range(16))
    log_signal = np.log(data)
    design = np.hstack([np.ones((16, 1)), tensor_design(gradients)])
    ols = log_signal @ np.linalg.pinv(design).T
    weights = np.exp(2 * ols @ design.T)
    for fold in range(16):
        train = np.delete(np.arange(16), fold)
        for v in range(len(data)):
            w = weights[v, train]
            x = design[train]
            coef = np.linalg.solve(x.T @ (w[:, None] * x), x.T @ (w * log_signal[v, train]))
            assert predictions[v, fold] == pytest.approx(np.exp(design[fold] @ coef), rel=1e-4)
    coef, leverage = _weighted_fit(log_signal, design)
    assert coef.shape == (20, 7) and np.all((leverage > 0) & (leverage < 1))


def test_dti_fits_s0_with_the_b0_volumes():
    """Tensor data with b=0 columns: every fold, b=0 ones included, is predicted exactly."""
    gradients = np.vstack([np.zeros((3, 4)), two_shell_gradients(14)])
    tensor = np.array([1.5e-3, 0.4e-3, 0.5e-3, 0.1e-3, 0.0, -0.05e-3])
    s0 = RNG.uniform(500, 1500, (10, 1))
    data = s0 * np.exp(-(tensor_design(gradients) @ -tensor))[None]
    data = s0 * np.exp(tensor_design(gradients) @ tensor)[None]
    predictions = DTIModel().predict_folds(data, {"gradients": gradients}, range(17))
    np.testing.assert_allclose(predictions, data, rtol=1e-4)


def test_a_plain_function_is_a_model():
    seen = {}

    def first_training_volume(train, train_meta, test_meta):
        seen["train"], seen["index"] = train.shape, test_meta["index"]
        return train[:, 0]

    model = get_model(first_training_volume)
    assert isinstance(model, CallableModel)
    data = np.arange(20, dtype=np.float32).reshape(4, 5)
    predictions = predict_folds(model, data, {}, [0, 3])
    np.testing.assert_array_equal(predictions[:, 0], data[:, 1])
    np.testing.assert_array_equal(predictions[:, 1], data[:, 0])
    assert seen == {"train": (4, 4), "index": 3}


def test_model_errors_are_clear():
    with pytest.raises(nidask.InputError, match="unknown model 'spline'"):
        get_model("spline")
    with pytest.raises(nidask.InputError, match="needs a DWI with a bzero"):
        B0Model().predict_folds(np.ones((3, 4)), {}, [0])
    with pytest.raises(nidask.InputError, match="frame timing"):
        TemporalModel().predict_folds(np.ones((3, 4)), {}, [0])
    with pytest.raises(nidask.InputError, match="statistic"):
        AverageModel("mode")


def test_fold_orders():
    assert fold_order(5).tolist() == [0, 1, 2, 3, 4]
    assert fold_order(5, "reverse").tolist() == [4, 3, 2, 1, 0]
    shuffled = fold_order(20, "random", seed=3)
    assert sorted(shuffled.tolist()) == list(range(20))
    assert shuffled.tolist() == fold_order(20, "random", seed=3).tolist()
    assert shuffled.tolist() != fold_order(20, "random", seed=4).tolist()
    assert fold_order(4, "bvalue", bvals=[2000, 1000, 3000, 1000]).tolist() == [1, 3, 0, 2]
    with pytest.raises(nidask.InputError, match="needs a DWI"):
        fold_order(4, "bvalue")
    with pytest.raises(nidask.InputError, match="unknown fold order"):
        fold_order(4, "shuffle")


@pytest.fixture
def series(tmp_path):
    data = RNG.uniform(0, 100, (9, 8, 7, 11)).astype(np.float32)
    path = str(tmp_path / "series.npy")
    np.save(path, np.asfortranarray(data))
    mask = np.zeros(data.shape[:3], dtype=bool)
    mask[2:7, 1:6, 1:6] = True
    mask[0, 0, 0] = True
    return data, path, mask


def test_voxel_major_matrix_holds_the_masked_voxels(series, tmp_path, monkeypatch):
    data, path, mask = series
    import dask

    with dask.config.set({"nidask.chunk-size": "4kB"}):  # many row blocks
        target = write_voxel_major(path, mask, str(tmp_path / "voxels.npy"))
    voxels = np.load(target)
    assert voxels.shape == (mask.sum(), 11) and voxels.flags.c_contiguous
    expected = data.reshape(-1, 11, order="F")[mask_index(mask)]
    np.testing.assert_array_equal(voxels, expected)
    np.testing.assert_array_equal(read_rows(target, 3, 9), expected[3:9])
    np.testing.assert_array_equal(scatter(expected[:, 4], mask)[mask], data[..., 4][mask])
    assert scatter(expected[:, 4], mask)[~mask].max() == 0


def test_row_blocks_cover_every_row_once_within_the_budget():
    flat = np.sort(RNG.choice(10_000, 700, replace=False))
    blocks = row_blocks(flat, 10_000, row_bytes=8, budget=8 * 500)
    assert blocks[0][0] == 0 and blocks[-1][1] == 700
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    assert all(flat[b - 1] - flat[a] < 500 for a, b in blocks)


@pytest.mark.parametrize("model", [AverageModel(), TemporalModel()])
def test_sweep_writes_every_fold_prediction_as_a_column(series, tmp_path, model):
    data, path, mask = series
    voxels = write_voxel_major(path, mask, str(tmp_path / "voxels.npy"))
    meta = {"midframe": np.arange(11.0) * 60}
    import dask

    with dask.config.set({"nidask.chunk-size": "2kB"}):
        target = sweep_predictions(voxels, model, meta, str(tmp_path / "pred.npy"))
    predictions = np.load(target)
    assert predictions.flags.f_contiguous
    expected = predict_folds_by_fitting(model, np.load(voxels), meta, range(11))
    np.testing.assert_allclose(predictions, expected, rtol=1e-5)
    np.testing.assert_array_equal(read_column(target, 6), predictions[:, 6])


def test_group_residuals_in_row_blocks_match_the_whole_block():
    """``_mean_squared`` scans rows a few at a time and gives the block's own means."""
    from nidask.estimation.lofo import _mean_squared

    rng = np.random.default_rng(4)
    data = rng.normal(size=(1001, 12)).astype(np.float32)
    predictions = rng.normal(size=(1001, 5)).astype(np.float32)
    data_columns, prediction_columns = np.array([1, 4, 7, 11]), np.array([0, 2, 3, 4])
    got = _mean_squared(data, data_columns, predictions, prediction_columns, rows=64)
    expected = ((data[:, data_columns] - predictions[:, prediction_columns]) ** 2).mean(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.dtype == np.float32 and got.shape == (1001,)


def test_scattered_rows_are_read_under_one_open(tmp_path):
    from nidask.estimation.estimator import sample_rows
    from nidask.io.npy import NpyFile

    matrix = np.arange(500 * 7, dtype=np.float32).reshape(500, 7)
    np.save(tmp_path / "m.npy", matrix)
    rows = np.array([3, 4, 90, 91, 499])
    np.testing.assert_array_equal(NpyFile.open(tmp_path / "m.npy").read_blocks(rows), matrix[rows])
    candidates = np.arange(10, 400, 3)
    picks = candidates[np.unique(np.linspace(0, len(candidates) - 1, 20).astype(int))]
    sample = sample_rows(str(tmp_path / "m.npy"), 20, candidates)
    np.testing.assert_array_equal(sample, matrix[picks])
