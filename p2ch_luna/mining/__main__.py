import sys

from p2ch_luna.mining.cli import main

sys.exit(main())
