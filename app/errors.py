"""Every failure of a UI action becomes a message in the page (gr.Error), never a stack-trace page.

The project's own errors (trainer.errors.StudioError: ConfigError, DatasetError, ModelError, LoraFamilyError, the
UI's UserError, ...) and OSError (a file missing or unwritable) already name the file/value and the fix: those are
shown as they are. Anything else, a ValueError or KeyError of a library included, is a bug: it is shown with its
type and message plus a pointer to the terminal, where the full traceback is logged.
"""
from __future__ import annotations

import functools
import html
import inspect
import logging
import re

import gradio as gr

from trainer.errors import USER_ERRORS, StudioError

log = logging.getLogger("app")


class UserError(StudioError):
    """A refused UI action (bad upload, second training, ...); the message says what to do."""


def shown_as_gr_error(fn):
    """Decorator for event handlers (plain or generators): exceptions become gr.Error with a helpful message."""
    action = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "action")

    if inspect.isgeneratorfunction(fn) or inspect.isgeneratorfunction(getattr(fn, "func", None)):
        @functools.wraps(fn)
        def streaming(*args, **kwargs):  # Gradio streams a handler only if it is a generator function itself
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001 - sorted out by as_gr_error
                raise as_gr_error(e, action) from e
        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - sorted out by as_gr_error
            raise as_gr_error(e, action) from e
    return wrapper


def as_gr_error(e: Exception, action: str) -> gr.Error:
    """The page's message for an exception: the user's to fix as it is, anything else with where to look."""
    if isinstance(e, USER_ERRORS):
        log.info("%s refused: %s", action, e)
        return gr.Error(shown_text(str(e)), print_exception=False)
    log.error("%s failed", action, exc_info=e)
    return gr.Error(shown_text(f"{action.replace('_', ' ')} failed: {type(e).__name__}: {e}. The full error is in "
                               "the terminal running the app; if it persists, report it with that text."),
                    print_exception=False)


def shown_text(text: str) -> str:
    """Text for a toast: the page renders a toast's message as HTML, so `<lora:name:1>` would vanish as a tag."""
    return html.escape(str(text), quote=False)


def plain_markdown(text: str) -> str:
    """Text for a gr.Markdown output, shown as typed: no HTML tags, no emphasis from `*`/`_`, lines kept."""
    escaped = re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", html.escape(str(text), quote=False))
    return escaped.replace("\n", "  \n")
