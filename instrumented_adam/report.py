"""Kept so that `instrumented_adam.report` keeps working: the module lives in `instrumented_adam.analysis.report`."""

import sys as _sys

from .analysis import report as _module

_sys.modules[__name__] = _module
