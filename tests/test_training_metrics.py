"""The logged row reduces the per-step metrics since the last log with clu: the mean of each metric, the
last learning rate; the on-device finiteness flag is not logged."""
import numpy as np
import pytest

from maejax.metrics import summarize_steps


def test_metrics_are_averaged_over_the_steps_and_the_lr_is_the_last():
    rows = [{"loss": np.float32(v), "mse": np.float32(2 * v), "lr": np.float32(0.1 * v), "finite": True}
            for v in (1.0, 2.0, 6.0)]
    out = summarize_steps(rows)
    assert set(out) == {"loss", "mse", "lr"}
    assert out["loss"] == pytest.approx(3.0) and out["mse"] == pytest.approx(6.0)
    assert out["lr"] == pytest.approx(0.6)


def test_a_single_step_is_its_own_summary():
    assert summarize_steps([{"loss": np.float32(0.5), "lr": np.float32(1e-3)}]) == pytest.approx(
        {"loss": 0.5, "lr": 1e-3})
