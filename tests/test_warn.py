"""The project's warnings name the project's line, not the framework frame that called it."""

from __future__ import annotations

import inspect
import re
import warnings

from dpg_lightning.common.warn import warn


def _step() -> int:
    line = inspect.currentframe().f_lineno + 1
    warn("step 0: non-finite rewards: policy update skipped")
    return line


def _framework_calls(fn):  # stands for Lightning's strategy calling training_step
    return fn()


def test_warn_names_the_calling_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _framework_calls(_step)
    assert len(caught) == 1
    w = caught[0]
    assert w.filename == __file__ and w.lineno == line, (w.filename, w.lineno)
    assert w.category is UserWarning and "non-finite" in str(w.message)


def test_a_filter_on_the_module_matches():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module=re.escape(__name__))
        _framework_calls(_step)
    assert caught == []
