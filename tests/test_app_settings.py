"""The settings form ↔ run config mapping, the run config's forced paths, and the launch flags."""
from __future__ import annotations

import pytest
from PIL import Image

from app import settings_form as form
from app.errors import UserError
from app.folders import Folders
from app.main import parse_args
from app.train_tab import run_config
from trainer.config import ConfigError, build_config, read_toml


def as_widgets(values):
    """What the browser sends back: gr.Number gives floats even for whole numbers."""
    return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]


def test_the_form_round_trips_a_config():
    cfg = build_config({"training": {"steps": 77, "seed": 3}, "network": {"rank": 8, "alpha": 4.0,
                        "train_text_encoder": False}, "optimizer": {"optimizer": "prodigy", "learning_rate": 1.0},
                        "sample": {"prompts": ["a red circle", "a blue square"], "every_n_steps": 25}})
    again = build_config(form.form_layer(as_widgets(form.form_values(cfg))))
    assert again.to_dict() == cfg.to_dict()
    assert form.form_values(cfg)[[s.key for s in form.SETTINGS].index("sample.prompts")] == "a red circle\na blue square"


def test_bad_form_values_name_the_setting():
    values = as_widgets(form.form_values(build_config()))
    keys = [s.key for s in form.SETTINGS]
    rank = keys.index("network.rank")
    with pytest.raises(ConfigError, match="`network.rank` must be a whole number"):
        form.form_layer(values[:rank] + [2.5] + values[rank + 1:])
    with pytest.raises(ConfigError, match="`network.rank` is empty"):
        form.form_layer(values[:rank] + [None] + values[rank + 1:])
    with pytest.raises(ConfigError, match="not valid TOML"):
        form.extra_layer("[data\ncrop = random")
    assert form.extra_layer('[data]\ncrop = "random"') == {"data": {"crop": "random"}}


def test_run_config_keeps_every_path_inside_the_app_folders(tmp_path):
    folders = Folders.create(tmp_path / "models", tmp_path / "out")
    ds = folders.dataset_path("shapes")
    ds.mkdir()
    Image.new("RGB", (64, 64)).save(ds / "a.png")
    values = as_widgets(form.form_values(build_config()))
    sneaky = '[output]\nlora_dir = "/tmp/elsewhere"\nrun_dir = "/tmp/elsewhere"\n[data]\ndataset = "/etc"\ncrop = "random"'
    cfg = run_config(folders, "shapes", "", None, "my-style", sneaky, values)
    assert cfg.output.lora_dir == str(folders.lora_dir) and cfg.run_path() == folders.runs_dir / "my-style"
    assert cfg.data.dataset == str(ds) and cfg.data.crop == "random"  # other extra keys do apply
    for bad in ("../escape", "a/b", "x:y"):
        with pytest.raises(UserError, match="LoRA name"):
            run_config(folders, "shapes", "", None, bad, "", values)
    with pytest.raises(UserError, match="has no images yet"):
        run_config(folders, "empty", "", None, "my-style", "", values)
    # an engine refusal names the setting as the form labels it, beside its config key
    keys = [s.key for s in form.SETTINGS]
    for key, bad, message in [("training.steps", -5.0, '"Steps" (`training.steps`) must be ≥ 0, got -5'),
                              ("optimizer.learning_rate", 0.0, '"Learning rate" (`optimizer.learning_rate`) must be > 0')]:
        i = keys.index(key)
        with pytest.raises(ConfigError) as e:
            run_config(folders, "shapes", "", None, "my-style", "", values[:i] + [bad] + values[i + 1:])
        assert message in str(e.value)
    # the config the UI writes is one the CLI reads back unchanged
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    assert build_config(read_toml(tmp_path / "config.toml")).to_dict() == cfg.to_dict()


def test_listen_requires_auth_and_says_how(capsys):
    args = parse_args([])
    assert (args.port, args.listen, args.auth) == (7860, False, None)
    with pytest.raises(SystemExit):
        parse_args(["--listen"])
    assert "--auth USER:PASSWORD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--listen", "--auth", "alice"])
    assert "--auth must be USER:PASSWORD" in capsys.readouterr().err
    args = parse_args(["--listen", "--auth", "alice:pa:ss", "--port", "9000", "--models-dir", "/m"])
    assert args.auth == ("alice", "pa:ss") and args.port == 9000 and args.models_dir == "/m"


def test_the_built_form_shows_the_default_preset_without_a_page_load_event(tmp_path):
    """The widgets carry the default preset's values from the start; a page-load event filling them in used to
    overwrite what a user had typed before it arrived."""
    from app.main import build_app

    demo = build_app(Folders.create(tmp_path / "models", tmp_path / "out"))
    by_label = {}
    for block in demo.blocks.values():  # the Train tab is built first: its "Steps" comes before the gallery's
        by_label.setdefault(getattr(block, "label", None), block)
    expected = form.preset_values(form.default_preset())
    for setting, value in zip(form.SETTINGS, expected):
        label = setting.label
        assert label in by_label, f"no widget labelled {label!r}"
        assert by_label[label].value == value, (setting.key, by_label[label].value, value)
