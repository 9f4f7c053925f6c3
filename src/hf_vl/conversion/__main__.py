"""``python -m hf_vl.conversion <arch> --source ... --checkpoint ... --output ...``: same as ``hf-vl convert``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
