"""The split between the user's errors (StudioError, OSError: one line) and bugs (anything else: a traceback)."""
from __future__ import annotations

import logging

import gradio as gr
import pytest

from app.errors import UserError, shown_as_gr_error
from trainer.config import ConfigError
from trainer.data.report import DatasetError
from trainer.errors import StudioError
from trainer.families import ModelError
from trainer.generate import LoraFamilyError
from trainer.lora_file import LoraFileError
from trainer.weights import WeightsError


@pytest.mark.parametrize("cls", [ConfigError, DatasetError, ModelError, LoraFamilyError, LoraFileError,
                                 WeightsError, UserError])
def test_the_projects_errors_are_studio_errors_and_not_value_errors(cls):
    assert issubclass(cls, StudioError) and not issubclass(cls, ValueError)


def raising(exc):
    def handler():
        raise exc
    return handler


def test_the_ui_shows_a_users_error_as_it_is(caplog):
    for exc in (ConfigError("`network.rank` must be ≥ 1"), FileNotFoundError("x.safetensors does not exist")):
        with caplog.at_level(logging.INFO, logger="app"), pytest.raises(gr.Error) as err:
            shown_as_gr_error(raising(exc))()
        assert err.value.message == str(exc)
        assert not any(r.exc_info for r in caplog.records)  # nothing to debug: no traceback in the terminal


def test_the_ui_shows_a_library_value_error_as_a_failure_with_its_traceback_in_the_terminal(caplog):
    for exc in (ValueError("operands could not be broadcast"), KeyError("down_blocks.0")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="app"), pytest.raises(gr.Error) as err:
            shown_as_gr_error(raising(exc))()
        assert f"failed: {type(exc).__name__}" in err.value.message and "terminal" in err.value.message
        assert any(r.exc_info and r.exc_info[1] is exc for r in caplog.records)
