"""Fault injection on the demo model: kill -9 at a random moment, SIGINT in the middle of a long optimiser step,
a stop during caching and during sampling, a full disk at the export, NaN losses (injected and from a learning
rate of 1000), two runs on one folder or one output, a stale lock. Every case ends with the user's work intact:
a resumable checkpoint, the same weights as an uninterrupted run, or a clear refusal before anything is lost."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer import loop, preflight, sampling
from trainer.checkpoint import load_checkpoint
from trainer.cli import main
from trainer.config import build_config
from trainer.data import LatentCache
from trainer.events import read_events
from trainer.lora_file import read_lora
from trainer.locks import LockedError
from trainer.run_folder import RunFolderError
from trainer.step_guard import DivergedError
from trainer.stopping import StopRequested

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "datasets" / "demo-style"


def demo(root: Path, name: str, cache: str = "runs", **sections):
    layers = {
        "preset": "demo",
        "data": {"dataset": str(DATASET)},
        "training": {"steps": 4, "batch_size": 1, "seed": 5},
        "sample": {"steps": 2, "every_n_steps": 0},
        # Measuring checkpoints (#15) takes three quarters of a run this short and changes no weight
        # (test_judge.py); only the kill -9 run keeps it, so a kill can land inside an evaluation too.
        "evaluation": {"at_checkpoints": "off"},
        "output": {"name": name, "lora_dir": str(root / "Lora"), "run_dir": str(root / cache / name),
                   "save_every_n_steps": 2, "save_precision": "fp32"},
    }
    for section, values in sections.items():
        layers[section] = {**layers.get(section, {}), **values}
    return build_config(layers)


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def cli_train(cfg, root: Path, *extra: str) -> subprocess.Popen:
    toml = root / f"{cfg.output.name}.toml"
    toml.write_text(cfg.to_toml())
    return subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(toml), *extra], cwd=root,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(run_dir: Path, test, proc: subprocess.Popen, timeout: float = 240) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        events = read_events(run_dir)
        if test(events):
            return events
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting in {run_dir}")


def same_weights(a: Path, b: Path) -> None:
    wa, wb = read_lora(a)[0], read_lora(b)[0]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def strict_json_lines(run_dir: Path) -> list[dict]:
    def refuse(constant):
        raise AssertionError(f"bare {constant} in events.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs are the reference for the trainer processes (one thread each), bit for bit: a sum split over
    two threads rounds differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def straight(one_thread, tmp_path_factory):
    """The uninterrupted runs every interrupted one must reproduce exactly."""
    root = tmp_path_factory.mktemp("faults")
    plain = loop.train(demo(root, "straight"))
    accum = loop.train(demo(root, "straight-accum", training={"grad_accum": 2, "steps": 3}))
    return root, plain, accum


def test_kill_9_at_a_random_moment_then_resume_gives_the_same_weights(straight):
    root, plain, _ = straight
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000))
    moment = random.Random(seed).uniform(2.0, 3.9)  # in steps: after the first checkpoint, before the end
    cfg = demo(root, "killed", evaluation={"at_checkpoints": "auto"})
    proc = cli_train(cfg, root)
    # After the first checkpoint is complete (killed while writing it, there is no run yet to protect or resume:
    # a fresh start is right then), then somewhere in a step, an evaluation, a checkpoint or the export.
    wait_for(cfg.run_path(), lambda ev: any(e["event"] == "checkpoint" for e in ev)
             and sum(e["event"] == "step" for e in ev) >= int(moment), proc)
    time.sleep((moment % 1) * 0.3)  # somewhere inside the next step (or its checkpoint)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert (cfg.run_path() / "run.lock").exists()  # left behind by the dead process: stale
    with pytest.raises(RunFolderError, match="holds another run's checkpoints"):
        loop.train(cfg)  # a fresh start would overwrite the killed run: refused
    resumed = loop.train(cfg, resume=True)
    same_weights(resumed, plain)  # FAULT_SEED={seed} reproduces the moment


def test_stop_in_the_middle_of_accumulation_rewinds_to_the_step(straight, monkeypatch):
    root, _, accum = straight
    cfg = demo(root, "mid-accum", training={"grad_accum": 2, "steps": 3})
    stop, real_loss, calls = StopRequested(), loop._loss, []

    def loss(run, draws):  # Stop pressed during the 3rd micro-batch: the first of step 2's two
        calls.append(1)
        stop.flag = stop.flag or len(calls) == 3
        return real_loss(run, draws)
    monkeypatch.setattr(loop, "_loss", loss)
    assert loop.train(cfg, stop=stop) is None
    assert len(calls) == 3  # no 4th micro-batch: the stop did not wait for the step to end
    stopped = read_events(cfg.run_path())[-1]
    assert stopped["event"] == "stopped" and stopped["step"] == 1 and Path(stopped["checkpoint"]).is_dir()
    monkeypatch.setattr(loop, "_loss", real_loss)
    same_weights(loop.train(cfg, resume=True), accum)  # the half-done step was rewound, not lost or doubled


def test_a_stop_is_prompt_its_checkpoint_written_once_and_not_measured(straight, monkeypatch):
    """Stop at step 2, where a checkpoint is scheduled (and measured): that one is the stop's, not a second copy.
    Stop at step 3 after a resume: a checkpoint is saved but not measured (a stop should not wait for pictures)."""
    root, plain, _ = straight
    cfg = demo(root, "stop-at-checkpoint", evaluation={"at_checkpoints": "auto"})
    saved, real_save = [], loop.save_checkpoint

    def save(run_dir, step, *args, **kwargs):
        saved.append(step)
        return real_save(run_dir, step, *args, **kwargs)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    assert loop.train(cfg, stop=StopRequested(at_step=2)) is None
    events = read_events(cfg.run_path())
    assert saved == [2] and [e["step"] for e in events if e["event"] == "evaluation"] == [2]
    assert events[-1]["event"] == "stopped" and events[-1]["checkpoint"].endswith("step_000002")
    assert loop.train(cfg, resume=True, stop=StopRequested(at_step=3)) is None
    events = read_events(cfg.run_path())
    assert saved == [2, 3] and [e["step"] for e in events if e["event"] == "evaluation"] == [2]
    same_weights(loop.train(cfg, resume=True), plain)


def test_stop_during_latent_caching(straight, monkeypatch):
    root = straight[0]
    cfg = demo(root, "caching", cache="cold")  # a cold cache: every latent is encoded
    stop, calls = StopRequested(), []
    original = LatentCache.get_or_encode

    def encode(self, key, make):
        calls.append(key)
        if len(calls) == 3:
            stop.flag = True
        return original(self, key, make)
    monkeypatch.setattr(LatentCache, "get_or_encode", encode)
    assert loop.train(cfg, stop=stop) is None
    assert len(calls) == 3  # of 32 (16 images, flipped too)
    events = read_events(cfg.run_path())
    assert events[-1]["event"] == "stopped" and events[-1]["checkpoint"] is None
    assert not any(e["event"] == "step" for e in events)


def test_stop_during_sampling_keeps_the_step_and_resumes_exactly(straight, monkeypatch):
    root, plain, _ = straight
    cfg = demo(root, "sampling", sample={"every_n_steps": 3, "steps": 20})  # a sample after step 3 of 4
    stop, calls = StopRequested(), []
    original = sampling.render_embeds

    def render(pipe, embeds, *args, progress=None, **kwargs):
        def spy(step, total, latents):
            if not any(e["event"] == "step" for e in read_events(cfg.run_path())):
                return progress(step, total, latents) if progress else False  # the base model's step-0 samples
            calls.append(step)
            if len(calls) == 2:
                stop.flag = True
            return progress(step, total, latents) if progress else False
        return original(pipe, embeds, *args, progress=spy, **kwargs)
    monkeypatch.setattr(sampling, "render_embeds", render)
    assert loop.train(cfg, stop=stop) is None
    assert len(calls) == 2  # of 20 denoising steps
    stopped = read_events(cfg.run_path())[-1]
    assert stopped["event"] == "stopped" and stopped["step"] == 3 and Path(stopped["checkpoint"]).is_dir()
    monkeypatch.setattr(sampling, "render_embeds", original)
    same_weights(loop.train(cfg, resume=True), plain)


def test_full_disk_at_the_export_keeps_the_final_checkpoint(straight, monkeypatch, capsys):
    root, plain, _ = straight
    cfg = demo(root, "disk-full", output={"lora_dir": str(root / "full")})
    real_write = Path.write_bytes

    def full(self, data):  # the LoRA's folder fills up halfway through the file
        if self.parent == root / "full":
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data)
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as e:
        loop.train(cfg)
    monkeypatch.undo()
    message = read_events(cfg.run_path())[-1]["message"]
    assert f"python -m trainer export {cfg.run_path()}" in message and "No space left" in message
    assert [p.name for p in (root / "full").iterdir()] in ([], ["disk-full.preview.png"])  # no partial file
    out = root / "freed" / "disk-full.safetensors"
    assert main(["export", str(cfg.run_path()), "--out", str(out)]) == 0
    same_weights(out, plain)


def test_nan_losses_skip_steps_then_stop_and_nothing_nan_is_kept(straight):
    root = straight[0]
    cfg = demo(root, "lr-1000", optimizer={"learning_rate": 1000.0}, training={"steps": 30})
    with pytest.raises(DivergedError, match="learning rate 1000 is likely too high"):
        loop.train(cfg)
    events = strict_json_lines(cfg.run_path())
    skipped = [e for e in events if e["event"] == "skipped"]
    assert len(skipped) == cfg.training.max_nonfinite_steps
    assert events[-1]["event"] == "error" and "last good checkpoint" in events[-1]["message"]
    for ckpt in (cfg.run_path() / "checkpoints").glob("step_*"):
        lora, state = load_checkpoint(ckpt)
        assert all(torch.isfinite(t).all() for part in lora.values() for t in part.values())
    assert not cfg.output_path().exists()


def test_a_single_nan_step_is_skipped_and_the_run_finishes(straight, monkeypatch):
    root = straight[0]
    cfg = demo(root, "one-nan")
    real_loss, calls = loop._loss, []

    def loss(run, draws):
        calls.append(1)
        value = real_loss(run, draws)
        return value * float("nan") if len(calls) == 3 else value
    monkeypatch.setattr(loop, "_loss", loss)
    out = loop.train(cfg)
    events = strict_json_lines(cfg.run_path())
    assert [e["step"] for e in events if e["event"] == "skipped"] == [3]  # step 3's first try
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    assert all(torch.isfinite(t).all() for t in read_lora(out)[0].values())


def test_a_second_run_is_refused_and_sigint_stops_within_a_micro_batch(straight):
    root = straight[0]
    # 3000 micro-batches per optimiser step: a stop that waited for the step would take many minutes
    cfg = demo(root, "busy", training={"grad_accum": 3000, "steps": 2})
    proc = cli_train(cfg, root)
    try:
        wait_for(cfg.run_path(), lambda ev: any(e["event"] == "start" for e in ev), proc)
        with pytest.raises(LockedError, match=f"run folder .*busy is in use by another training \\(pid {proc.pid}"):
            loop.train(cfg)
        elsewhere = demo(root, "busy", cache="elsewhere")
        with pytest.raises(LockedError, match=f"busy.safetensors is in use by another training \\(pid {proc.pid}"):
            loop.train(elsewhere)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-2000:]
    events = strict_json_lines(cfg.run_path())
    assert [e["event"] for e in events].count("start") == 1  # the refused runs wrote nothing into it
    assert events[-1] == dict(events[-1], event="stopped", step=0, checkpoint=None)
    assert "no checkpoint was made" in out


def test_a_run_folder_belongs_to_one_run(straight):
    root = straight[0]
    import shutil

    shutil.copytree(root / "runs" / "straight", root / "runs" / "owned")
    cfg = demo(root, "owned", training={"seed": 6})
    with pytest.raises(RunFolderError, match="training.seed: 5 → 6"):
        loop.train(cfg, resume=True)
    with pytest.raises(RunFolderError, match="--resume, choose another name .* --overwrite"):
        loop.train(cfg)
    assert loop.train(demo(root, "owned", training={"steps": 2}), overwrite=True).exists()
    steps = sorted(p.name for p in (cfg.run_path() / "checkpoints").iterdir())
    assert steps == ["step_000002"]  # the old run's are gone, the new run's kept


def test_the_lora_is_written_before_the_last_samples(straight, monkeypatch):
    root, plain, _ = straight
    cfg = demo(root, "sample-crash")

    def crash(*args, **kwargs):
        raise RuntimeError("out of memory while sampling")
    monkeypatch.setattr(sampling, "render_embeds", crash)
    with pytest.raises(RuntimeError, match="out of memory while sampling"):
        loop.train(cfg)
    same_weights(cfg.output_path(), plain)
    kinds = [e["event"] for e in read_events(cfg.run_path())]
    assert kinds[-2:] == ["saved", "error"] and "checkpoint" in kinds


def test_checkpoints_on_the_clock_without_step_intervals(straight, monkeypatch):
    root = straight[0]
    from trainer import step_guard

    ticks = iter(range(0, 10**6, 400))  # each look at the clock: 400 s later (10 minutes pass every 2nd look)
    monkeypatch.setattr(step_guard, "monotonic", lambda: next(ticks))
    cfg = demo(root, "clock", output={"save_every_n_steps": 0})
    assert cfg.output.save_every_n_minutes == 10  # the default, in every preset
    loop.train(cfg)
    saved = [e["step"] for e in read_events(cfg.run_path()) if e["event"] == "checkpoint"]
    assert saved[:-1] and saved[-1] == 4  # clock checkpoints during the run, and the final one


@pytest.mark.parametrize("layer,match", [
    ({"network": {"rank": 100000}}, "`network.rank` = 100000 is wider than the narrowest layer"),
    ({"data": {"resolution": 65536}}, "`data.resolution` = 65536 .* GB are available"),
    ({"training": {"batch_size": 100000}}, "`training.batch_size` = 100000 needs at least"),
    ({"model": {"clip_skip": 100}}, "`model.clip_skip` = 100 skips all"),
])
def test_impossible_sizes_are_refused_before_training(straight, layer, match):
    root = straight[0]
    cfg = demo(root, "absurd", **layer)
    with pytest.raises(preflight.PreflightError, match=match):
        loop.train(cfg)
    kinds = [e["event"] for e in read_events(cfg.run_path())]
    assert "step" not in kinds and not (cfg.run_path() / "checkpoints").exists()
    if "data" in layer or "training" in layer:  # before the dataset is decoded at that size
        assert "dataset" not in kinds


def test_too_little_disk_is_refused_before_training(straight, monkeypatch):
    root = straight[0]
    Usage = __import__("collections").namedtuple("Usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 10**5, 10**5))
    cfg = demo(root, "tiny-disk")
    with pytest.raises(preflight.PreflightError, match="not enough free space"):
        loop.train(cfg)
    assert not any(e["event"] == "step" for e in read_events(cfg.run_path()))
