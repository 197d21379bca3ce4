"""`instrumented_adam.functional`: the functional layer, which lives in `instrumented_adam.core.functional`."""

import sys as _sys

from .core import functional as _module

_sys.modules[__name__] = _module
