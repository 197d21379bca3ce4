import torch  # noqa: F401  (loads libtorch before our op library)

from . import _C  # noqa: F401  (registers the ops)
