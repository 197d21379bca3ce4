"""Kept so that `instrumented_adam.store` keeps working: the module lives in `instrumented_adam.telemetry.store`."""

import sys as _sys

from .telemetry import store as _module

_sys.modules[__name__] = _module
