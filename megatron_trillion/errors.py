"""The project's one exception class for mistakes a user can fix (bad flags, configs, data paths).

Entry points catch exactly this around parsing, validation and data checks and print one clear line
(exit status 2). Anything else - a bug here, in megatron-core, in torch - is left to propagate with its
traceback on the rank where it happened, so real failures stay diagnosable.
"""

from __future__ import annotations


class UserError(ValueError):
    """Invalid user input: the message names the problem, where it is, and what to do instead.

    Subclasses ValueError so code that predates it (and callers that catch ValueError) keep working.
    """
