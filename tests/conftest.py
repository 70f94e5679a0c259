import os
import tempfile

# Tests run on the CPU in fp32.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compile cache for the whole test session (and the subprocesses it starts): many tests build
# the same tiny model, and compiling its train step dominates their run time.
os.environ.setdefault("ATTNLAB_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "attnlab-test-xla-cache"))

from lm.runtime import enable_compile_cache  # noqa: E402

enable_compile_cache()
