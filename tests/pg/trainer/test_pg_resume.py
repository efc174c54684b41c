"""Mask learning resumed from a Trainer checkpoint continues exactly as an uninterrupted run."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import SEQ_LEN, build_model
from pg_helpers import StopAt, Windows, make_trainer

from optimum_sparse import SparsityCallback, SparsityConfig
from optimum_sparse.calibration import sample_windows, tokenize


@pytest.fixture
def dataset(tokenizer, calibration_text) -> Windows:
    return Windows(sample_windows(tokenize(calibration_text, tokenizer), 16, SEQ_LEN, seed=0))


def _run(dataset, output_dir, config, optim, stop_at=None, resume=None):
    callback = SparsityCallback(config)
    extra = dict(save_strategy="steps", save_steps=2) if stop_at or resume else {}
    trainer = make_trainer(
        build_model("llama"),
        dataset,
        callback,
        output_dir,
        steps=4,
        callbacks=[StopAt(stop_at)] if stop_at else [],
        optim=optim,
        learning_rate=0.05 if optim == "sgd" else 0.01,
        **extra,
    )
    trainer.train(resume_from_checkpoint=resume)
    return callback


@pytest.mark.parametrize(
    "pattern, optim, ratio",
    [("channels", "sgd", "joint"), ("unstructured", "adamw_torch", "joint"), ("channels", "sgd", "unit")],
    ids=["channels-sgd", "unstructured-adam", "channels-unit-ratios"],
)
def test_resumed_training_equals_straight_training(dataset, tmp_path, pattern, optim, ratio):
    # refresh_every=3: the sample drawn at step 0 is still in use when the run resumes at step 2
    config = SparsityConfig(
        method="pg", pattern=pattern, sparsity=0.3, refresh_every=3, num_samples=8, importance_ratio=ratio
    )
    straight = _run(dataset, tmp_path / "straight", config, optim)
    _run(dataset, tmp_path / "resumed", config, optim, stop_at=2)
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert os.path.isfile(checkpoint / "pg_mask_learning_rank0.pt")
    resumed = _run(dataset, tmp_path / "resumed", config, optim, resume=str(checkpoint))

    assert torch.equal(straight.learner.scores, resumed.learner.scores)
    assert resumed.learner.estimator.baseline == straight.learner.estimator.baseline
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert [h["staleness"] for h in resumed.history] == [0.0, 1.0, 2.0, 0.0]
    assert resumed.learner.refreshes == 2
    assert torch.equal(straight.hard_mask, resumed.hard_mask)
    if ratio == "unit":  # one log-probability per unit of the stale sample
        assert resumed.learner.log_prob_then.shape == (1, resumed.learner.scores.numel())


def test_a_new_rank_starts_from_rank_zero_state_with_its_own_samples(tmp_path):
    from optimum_sparse.pg.estimation.estimator import ScoreFunctionEstimator
    from optimum_sparse.pg.learner import StaleSubModelLearner
    from optimum_sparse.pg.trainer import checkpointing
    from optimum_sparse.pg.trainer.callback import build_space

    config = SparsityConfig(method="pg", pattern="channels", sparsity=0.3, refresh_every=4)

    def learner(seed: int) -> StaleSubModelLearner:
        return StaleSubModelLearner(build_space(build_model("llama"), config), ScoreFunctionEstimator(), 4, seed=seed)

    saved = learner(0)
    saved.training_loss(lambda: torch.tensor(2.0))
    saved.end_step()
    checkpointing.save_state(str(tmp_path), 0, saved.state_dict())
    assert checkpointing.load_state(str(tmp_path), 3) is not None
    assert checkpointing.load_state(str(tmp_path / "missing"), 0) is None

    exact, new_rank = learner(0), learner(1)
    exact.load_state_dict(checkpointing.load_state(str(tmp_path), 0))
    new_rank.load_state_dict(checkpointing.load_state(str(tmp_path), 1))
    for restored in (exact, new_rank):
        assert torch.equal(restored.scores, saved.scores) and restored.step == 1
        assert restored.estimator.baseline == 2.0
    assert torch.equal(exact.samples, saved.samples) and new_rank.samples is None
    exact.training_loss(lambda: torch.tensor(1.0))
    new_rank.training_loss(lambda: torch.tensor(1.0))
    assert exact.refreshes == 1 and new_rank.refreshes == 2  # the new rank draws its own sample
    assert not torch.equal(new_rank.samples, saved.samples)
