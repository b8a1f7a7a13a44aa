"""Everything about the package is in setup.cfg; this file only adds the C kernels (``tun/_gso_c.c``).

The extension is *optional*: where no C compiler or Python headers are found the install still succeeds
(setuptools warns), the numpy kernels run, and a fast-path daemon's start-up log says why.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "tun._gso_c", ["tun/_gso_c.c"], optional=True,
    # -O3: GCC vectorizes the checksum loop only there (Debian's Python builds extensions with -O2)
    extra_compile_args=["-O3"],
)])
