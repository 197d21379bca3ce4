"""Kept so that `instrumented_adam.tasks` keeps working: the module lives in `instrumented_adam.demo.tasks`."""

import sys as _sys

from .demo import tasks as _module

_sys.modules[__name__] = _module
