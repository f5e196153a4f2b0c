"""Several LoRAs trained together in one process on one base model (trainer/multi_run.py), on the demo model.

The reference is each run trained alone with the same config: every tensor of each exported file must be equal,
bit for bit (the runs take turns with their own adapter, RNG, noise generator and optimiser: the same arithmetic).
The runs differ on purpose: datasets, ranks, learning rates, seeds, LoRA dropout (the global torch RNG), caption
dropout (text encoded at every step) and one run training the text encoder (its adapter must be off for the
others), one run sampling during training."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer import loop
from trainer.config import build_config
from trainer.events import read_events
from trainer.lora_file import read_lora
from trainer.multi_run import MultiRunError, train_many
from trainer.step_guard import DivergedError
from trainer.stopping import StopRequested

ROOT = Path(__file__).resolve().parent.parent


def demo(root: Path, name: str, dataset: str = "demo-style", **sections):
    layers = {
        "preset": "demo",
        "data": {"dataset": str(ROOT / "datasets" / dataset)},
        "training": {"steps": 4, "batch_size": 1, "seed": 5},
        "sample": {"steps": 2, "every_n_steps": 0},
        "evaluation": {"at_checkpoints": "off"},
        "output": {"name": name, "lora_dir": str(root / "Lora"), "run_dir": str(root / "runs" / name),
                   "save_every_n_steps": 2, "save_precision": "fp32"},
    }
    for section, values in sections.items():
        layers[section] = {**layers.get(section, {}), **values}
    return build_config(layers)


# Three different runs (see the module's docstring); the text-encoder run first, so its adapter exists while the
# others set up and step.
RUNS = {
    "te": dict(network={"train_text_encoder": True, "rank": 2, "dropout": 0.05}, training={"seed": 11}),
    "style": dict(sample={"every_n_steps": 2}, evaluation={"at_checkpoints": "auto"}),
    "char": dict(dataset="demo-character", network={"rank": 4, "dropout": 0.1}, optimizer={"learning_rate": 1e-3},
                 data={"caption_dropout": 0.3}, training={"seed": 7}),
}


def configs(root: Path, names=tuple(RUNS), prefix: str = "") -> list:
    return [demo(root, prefix + n, **RUNS[n]) for n in names]


def assert_same_lora(a: Path, b: Path) -> None:
    wa, wb = read_lora(a)[0], read_lora(b)[0]
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a sum split over two threads rounds differently: one, like the trainer processes
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    root = tmp_path_factory.mktemp("alone")
    return {cfg.output.name: loop.train(cfg) for cfg in configs(root)}


@pytest.fixture(scope="module")
def together(tmp_path_factory):
    root = tmp_path_factory.mktemp("together")
    cfgs = configs(root)
    return cfgs, train_many(cfgs)


def test_each_lora_trained_together_equals_the_one_trained_alone(alone, together):
    cfgs, outs = together
    assert [Path(o) for o in outs] == [c.output_path() for c in cfgs]
    for cfg, out in zip(cfgs, outs):
        assert_same_lora(out, alone[cfg.output.name])
    ranks = {cfg.output.name: read_lora(out)[0] for cfg, out in zip(cfgs, outs)}
    assert any(k.startswith("lora_te_") for k in ranks["te"]) and not any(k.startswith("lora_te_") for k in ranks["char"])
    assert {t.shape[0] for k, t in ranks["char"].items() if k.endswith("lora_down.weight")} == {4}
    # The samples drawn during training with the shared model are the run's own: the same pictures as alone.
    alone_samples = sorted((alone["style"].parent.parent / "runs" / "style" / "samples").glob("*.png"))
    together_samples = sorted((cfgs[1].run_path() / "samples").glob("*.png"))
    assert [p.name for p in alone_samples] == [p.name for p in together_samples] and together_samples
    for a, b in zip(alone_samples, together_samples):
        assert a.read_bytes() == b.read_bytes(), b.name


def test_each_run_has_its_own_events_checkpoints_and_output(together):
    cfgs, outs = together
    for cfg, out in zip(cfgs, outs):
        events = read_events(cfg.run_path())
        kinds = [e["event"] for e in events]
        assert kinds[0] == "dataset" and kinds[-1] == "done" and "error" not in kinds
        assert [e["run"] for e in events if e["event"] == "start"] == [cfg.output.name]
        assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
        assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]
        assert all(Path(e["lora"]).parent == cfg.run_path() / "loras" for e in events if e["event"] == "checkpoint")
        assert [e["path"] for e in events if e["event"] == "done"] == [str(out)]
        assert not (cfg.run_path() / "run.lock").exists()
    evaluated = {cfg.output.name: any(e["event"] == "evaluation" for e in read_events(cfg.run_path())) for cfg in cfgs}
    assert evaluated == {"te": False, "style": True, "char": False}  # per-run settings stay per run


def test_stop_then_resume_each_run_gives_the_same_weights(alone, tmp_path):
    cfgs = configs(tmp_path, ("style", "char"))
    assert train_many(cfgs, stop=StopRequested(at_step=2)) == [None, None]
    for cfg in cfgs:
        stopped = read_events(cfg.run_path())[-1]
        assert stopped["event"] == "stopped" and stopped["step"] == 2 and Path(stopped["checkpoint"]).is_dir()
        assert not cfg.output_path().exists()
    outs = train_many(cfgs, resume=True)
    for cfg, out in zip(cfgs, outs):
        assert read_events(cfg.run_path())[-1]["event"] == "done"
        assert_same_lora(out, alone[cfg.output.name])


def test_a_failing_run_does_not_stop_the_others(alone, tmp_path, monkeypatch):
    bad, good = demo(tmp_path, "bad", training={"max_nonfinite_steps": 2}), demo(tmp_path, "style", **RUNS["style"])
    real_loss = loop._loss

    def loss(run, draws):  # the bad run diverges: NaN losses from its first step
        value = real_loss(run, draws)
        return value * float("nan") if run.cfg.output.name == "bad" else value
    monkeypatch.setattr(loop, "_loss", loss)
    failed, out = train_many([bad, good])
    assert isinstance(failed, DivergedError)
    events = read_events(bad.run_path())
    assert events[-1]["event"] == "error" and "diverged" in events[-1]["message"]
    assert not bad.output_path().exists()
    assert read_events(good.run_path())[-1]["event"] == "done"
    assert_same_lora(out, alone["style"])


def test_runs_on_different_base_models_or_precisions_are_refused(tmp_path):
    a = demo(tmp_path, "a")
    other = tmp_path / "other-model"
    with pytest.raises(MultiRunError, match=r"`model.base_model` .* give every config the same `model.base_model`"):
        train_many([a, demo(tmp_path, "b", model={"base_model": str(other)})])
    with pytest.raises(MultiRunError, match=r"`training.mixed_precision` is 'no' in run a but 'bf16' in run b"):
        train_many([a, demo(tmp_path, "b", training={"mixed_precision": "bf16"})])
    with pytest.raises(MultiRunError, match="the same LoRA file"):
        train_many([a, demo(tmp_path, "a", output={"run_dir": str(tmp_path / "elsewhere")})])
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_cli_trains_several_configs_and_refuses_mismatches(tmp_path):
    a, b = demo(tmp_path, "a", training={"steps": 2}), demo(tmp_path, "b", "demo-character", training={"steps": 2})
    c = demo(tmp_path, "c", training={"steps": 2, "mixed_precision": "bf16"})
    for cfg in (a, b, c):
        (tmp_path / f"{cfg.output.name}.toml").write_text(cfg.to_toml())

    def cli(*names: str) -> subprocess.CompletedProcess:
        configs = [arg for n in names for arg in ("--config", str(tmp_path / f"{n}.toml"))]
        return subprocess.run([sys.executable, "-m", "trainer", "train", *configs], cwd=tmp_path, capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    refused = cli("a", "c")
    assert refused.returncode == 2 and "`training.mixed_precision`" in refused.stderr
    assert "Traceback" not in refused.stderr
    done = cli("a", "b")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"a: saved {a.output_path()}" in done.stdout and f"b: saved {b.output_path()}" in done.stdout
    assert read_lora(a.output_path())[0].keys() == read_lora(b.output_path())[0].keys()


def test_a_run_whose_folder_is_in_use_is_refused_alone_and_writes_nothing_there(alone, tmp_path):
    from trainer.locks import LockedError, run_lock

    busy, good = demo(tmp_path, "busy"), demo(tmp_path, "style", **RUNS["style"])
    busy.run_path().mkdir(parents=True)
    held = run_lock(busy.run_path())  # another training holds it
    try:
        refused, out = train_many([busy, good])
    finally:
        held.release()
    assert isinstance(refused, LockedError)
    assert not (busy.run_path() / "events.jsonl").exists()
    assert_same_lora(out, alone["style"])


def test_sigint_stops_every_run_with_its_checkpoint(tmp_path):
    cfgs = [demo(tmp_path, "a", training={"steps": 400}), demo(tmp_path, "b", "demo-character", training={"steps": 400})]
    args = []
    for cfg in cfgs:
        (tmp_path / f"{cfg.output.name}.toml").write_text(cfg.to_toml())
        args += ["--config", str(tmp_path / f"{cfg.output.name}.toml")]
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 180
        while not all(any(e["event"] == "step" for e in read_events(c.run_path())) for c in cfgs):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-2000:]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-2000:]
    for cfg in cfgs:
        stopped = read_events(cfg.run_path())[-1]
        assert stopped["event"] == "stopped" and 0 < stopped["step"] < 400 and Path(stopped["checkpoint"]).is_dir()
        assert f"{cfg.output.name}: stopped; a checkpoint was saved" in out
        assert not cfg.output_path().exists()
