"""Kept so that `instrumented_adam.recorder` keeps working: the module lives in `instrumented_adam.telemetry.recorder`."""

import sys as _sys

from .telemetry import recorder as _module

_sys.modules[__name__] = _module
