"""Build hook for the optional C kernels; all project metadata lives in pyproject.toml.

The extension ``gradsparse._kernels_c`` (src/gradsparse/_kernels.c, loaded with ctypes by
gradsparse.kernels) is optional: when it cannot be compiled (no C compiler, unsupported
platform) the install still succeeds and gradsparse.kernels uses its pure-torch path.
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":  # the kernels use pthreads; the torch path serves Windows
    ext_modules = []
else:
    ext_modules = [
        Extension(
            "gradsparse._kernels_c",
            sources=["src/gradsparse/_kernels.c"],
            extra_compile_args=["-O3", "-pthread", "-fno-strict-aliasing"],
            extra_link_args=["-pthread"],
            libraries=["m"],
            optional=True,
        )
    ]

setup(ext_modules=ext_modules)
