"""`python -m lmforge.model.kernels --build [-v]`: compile the native int4/int8 kernels (make install runs it).
Always exits 0: a failed build only means the PyTorch fallback is used, which must not stop an install."""

from __future__ import annotations

import argparse
import sys

from lmforge.model.kernels import build, build_root, isa


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmforge.model.kernels")
    p.add_argument("--build", action="store_true", help="compile the extension (a no-op when up to date)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    args = p.parse_args(argv)
    if not args.build:
        p.print_help()
        return 0
    if build(verbose=args.verbose):
        print(f"lmforge: native int4/int8 kernels ready ({isa()}) in {build_root()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
