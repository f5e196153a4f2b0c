"""A run folder belongs to one run: a fresh run over another's checkpoints is refused, --resume must continue the
same training, --overwrite clears the old run; the non-finite step guard and the checkpoint clock."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.config import build_config, save_config
from trainer.run_folder import RunFolderError, check_ownership, claim, config_differences
from trainer.locks import LockedError
from trainer.step_guard import CheckpointClock, DivergedError, NonFiniteGuard, step_is_finite


def cfg_in(tmp_path, **sections):
    layers = {"output": {"name": "r", "run_dir": str(tmp_path / "run"), "lora_dir": str(tmp_path / "Lora")}}
    layers.update(sections)
    return build_config(layers)


def with_checkpoint(cfg, step=100):
    ckpt = cfg.run_path() / "checkpoints" / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"x")
    save_config(cfg, cfg.run_path() / "config.toml")


def test_differences_name_the_keys_that_would_change_the_run(tmp_path):
    a = cfg_in(tmp_path)
    b = cfg_in(tmp_path, training={"seed": 7, "steps": 5000}, network={"rank": 4}, sample={"every_n_steps": 10})
    assert config_differences(a, b) == ["network.rank: 16 → 4", "training.seed: 42 → 7"]


def test_fresh_run_over_checkpoints_is_refused_and_overwrite_clears(tmp_path):
    old = cfg_in(tmp_path)
    with_checkpoint(old)
    (old.run_path() / "events.jsonl").write_text('{"event": "start"}\n')
    new = cfg_in(tmp_path, training={"seed": 1})
    with pytest.raises(RunFolderError, match=r"holds another run's checkpoints \(up to step 100\)"):
        check_ownership(new, resume=False, overwrite=False)
    assert (old.run_path() / "checkpoints").exists()
    with pytest.raises(RunFolderError, match="training.seed: 42 → 1"):
        check_ownership(new, resume=True, overwrite=False)
    check_ownership(cfg_in(tmp_path, training={"steps": 9000}), resume=True, overwrite=False)  # longer: fine
    check_ownership(new, resume=False, overwrite=True)
    assert not (old.run_path() / "checkpoints").exists() and not (old.run_path() / "events.jsonl").exists()


def test_a_claim_holds_the_folder_and_the_output(tmp_path):
    cfg = cfg_in(tmp_path)
    held = claim(cfg, resume=False, overwrite=False)
    with pytest.raises(LockedError, match="run folder"):
        claim(cfg, resume=False, overwrite=False)
    other = cfg_in(tmp_path, output={"name": "r", "run_dir": str(tmp_path / "run2"),
                                     "lora_dir": str(tmp_path / "Lora")})
    with pytest.raises(LockedError, match="r.safetensors is in use"):
        claim(other, resume=False, overwrite=False)
    held.release()
    claim(other, resume=False, overwrite=False).release()


def test_step_guard_counts_non_finite_steps_in_a_row():
    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.tensor([1.0, math.inf, 0.0])
    assert not step_is_finite(torch.tensor(0.5), params, check_grads=True)
    assert step_is_finite(torch.tensor(0.5), params, check_grads=False)  # fp16: the GradScaler's business
    assert not step_is_finite(torch.tensor(math.nan), params, check_grads=False)
    cfg = build_config({"training": {"max_nonfinite_steps": 3}, "optimizer": {"learning_rate": 10.0}})
    guard = NonFiniteGuard(cfg, "no")
    for finite in (False, False, True, False, False):
        guard.record(finite)
        guard.check()
    guard.record(False)
    with pytest.raises(DivergedError, match="NaN/inf for 3 steps in a row; the learning rate 10 is likely too high"):
        guard.check()
    assert guard.skipped == 5


def test_checkpoint_clock():
    clock = CheckpointClock(10, now=0.0)
    assert not clock.due(now=599.0) and clock.due(now=600.0)
    clock.reset(now=600.0)
    assert not clock.due(now=1199.0)
    assert not CheckpointClock(0, now=0.0).due(now=1e9)  # 0 = off
