#!/usr/bin/env python
"""Same as `relaxrec data prepare` (Megatron-LM users look for this name)."""

import sys

from relaxrec_megatron.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
