import sys

from p2ch_luna.training.cli import main

sys.exit(main())
