"""StudioError: the base of every error that is the user's to fix.

Its message is the whole story, one sentence naming the file or value and the fix, so the CLI prints it on one
line (exit code 2) and the UI shows it as it is. Anything else (a bug here or in numpy, PIL, diffusers) is not a
StudioError and keeps its traceback: that is why the project's errors do not derive from ValueError, which
library code raises for its own failures.
"""
from __future__ import annotations


class StudioError(Exception):
    """A refused input: a config value, a dataset, a model or LoRA file, a UI action. The message says the fix."""



class ModelError(StudioError):
    """A base model that cannot be used; the message names the path, the reason and the fix. (Here, not in
    families.py: the family rules, the weight readers and the loader all raise it.)"""


# OSError covers a file that is missing, unreadable or unwritable: its message names the file.
USER_ERRORS = (StudioError, OSError)
