"""The analysis and presentation layer: epoch series and their relations to the losses
(`relations`, re-exported here), figures (`plots`) and the HTML report (`report`). It reads the run
store only and never loads torch's kernels."""

from .relations import *  # noqa: F401,F403
from .relations import __all__  # noqa: F401
