"""Warnings that point at the project's line, not at whoever called it.

``warnings.warn(..., stacklevel=2)`` in a method that Lightning calls (``training_step``) names
Lightning's caller (``lightning/pytorch/strategies/strategy.py:391: step 0: non-finite ...``):
the user looks in the wrong place, and a filter on the project's modules does not match.
:func:`warn` attributes the warning to the line that calls it, in the calling module (its file,
line and ``__name__``), whatever the call stack above it is.
"""

from __future__ import annotations

import sys
import warnings


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue ``message`` as a warning of ``category`` from the caller's own line (see module
    doc); shown once per line like :func:`warnings.warn`'s default."""
    frame = sys._getframe(1)
    module_globals = frame.f_globals
    warnings.warn_explicit(
        message,
        category,
        filename=frame.f_code.co_filename,
        lineno=frame.f_lineno,
        module=module_globals.get("__name__", "<unknown>"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
    )
