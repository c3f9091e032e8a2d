# Local stub package for mypy (tests/test_tensorrt_typecheck.py puts tests/stubs on MYPYPATH).
# The core API comes from the installed `tensorrt-stubs` (10.13); this file only adds the
# `tensorrt.plugin` submodule, which those stubs do not cover (see plugin.pyi).
from tensorrt_bindings.tensorrt import *

from . import plugin as plugin

__version__: str
