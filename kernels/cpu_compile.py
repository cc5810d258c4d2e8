"""The build step of packserve.kernels.cpu_lib, run as a child process: `python -m packserve.kernels.cpu_compile
SPEC` compiles the operator library with torch.utils.cpp_extension (ninja) as SPEC (JSON: the keyword arguments
of cpp_extension.load) says. A child, so that a timeout can kill the whole build (ninja, the compiler, cc1plus)."""

from __future__ import annotations

import json
import sys


def main() -> int:
    from torch.utils import cpp_extension

    spec = json.loads(sys.argv[1])
    # is_python_module=False: a plain shared library of TORCH_LIBRARY registrations (loaded here too, harmlessly).
    cpp_extension.load(**spec, is_python_module=False, verbose=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
