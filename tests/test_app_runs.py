"""The Runs view: every run listed with its state and progress from its own events; a run's settings put back
into the form give the very same config when started again ("Train again")."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from app import runs
from app.folders import Folders
from app.jobs import Jobs
from app.train_tab import run_config
from trainer.events import EventLog


@pytest.fixture
def world(tmp_path):
    folders = Folders.create(tmp_path / "models", tmp_path / "outputs")
    data = folders.dataset_path("shapes")
    data.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    (data / "a.png").write_bytes(buf.getvalue())
    return folders, Jobs(folders.runs_dir)


def test_train_again_reproduces_the_run_config(world):
    folders, jobs = world
    from app import settings_form as form

    values = form.preset_values("demo")
    values[[s.key for s in form.SETTINGS].index("network.rank")] = 12
    extra = '[data]\ntrigger_word = "zebra \\"style\\""\ncrop = "random"\n[sample]\ncfg = 5.5\n'
    from trainer.models import DEMO_MODEL_DIR

    cfg = run_config(folders, "shapes", str(DEMO_MODEL_DIR), "demo", "first", extra, values)  # as the picker gives it
    run = cfg.run_path()
    run.mkdir(parents=True)
    (run / "config.toml").write_text(cfg.to_toml())

    dataset, base, name, extra_back, values_back = runs.form_fill(folders, run)
    assert (dataset, name) == ("shapes", "first")
    again = run_config(folders, dataset, base, None, name, extra_back, values_back)  # no preset: all shown
    assert again.to_dict() == cfg.to_dict()
    assert 'trigger_word = "zebra \\"style\\""' in extra_back and "cfg = 5.5" in extra_back
    assert runs.next_name(jobs, folders, "first") == "first-2"


def test_runs_table_lists_each_run_with_its_state(world):
    folders, jobs = world
    for name, steps in (("done-run", 4), ("stopped-run", 2), ("queued-run", 0)):
        run = folders.runs_dir / name
        run.mkdir(parents=True)
        (run / "config.toml").write_text(f'[data]\ndataset = "{folders.dataset_path("shapes")}"\n'
                                         '[training]\nsteps = 4\n')
        if steps:
            log = EventLog(run)
            (run / "train.log").write_text("")
            log.emit("start", run=name, total_steps=4, steps_per_epoch=4, family="sd1", base_model="x",
                     resumed_from=None)
            for s in range(1, steps + 1):
                log.emit("step", step=s, total=4, epoch=0, loss=1.0 / s, lr=1e-4, it_s=None, eta_s=None)
            if steps == 4:
                log.emit("done", path="x.safetensors", step=4, seconds=1.0)
            else:
                (run / "checkpoints" / "step_000002").mkdir(parents=True)
                log.emit("stopped", step=2, checkpoint=str(run / "checkpoints" / "step_000002"))
    table = runs.runs_table(folders, jobs, queued=["queued-run"]).set_index("run")
    assert table.loc["done-run", ["steps", "state", "last loss", "dataset", "base model"]].tolist() == \
        ["4/4", "finished", 0.25, "shapes", "Demo model"]
    assert table.loc["stopped-run", ["steps", "state", "last loss"]].tolist() == ["2/4", "stopped", 0.5]
    assert table.loc["queued-run", ["steps", "state"]].tolist() == ["0/4", "queued"]
    view = jobs.view(folders.runs_dir / "stopped-run")
    assert runs.checkpoints_text(view).startswith("Checkpoints: step 2 (in ")
