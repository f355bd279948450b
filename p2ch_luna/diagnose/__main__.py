import sys

from p2ch_luna.diagnose.cli import main

sys.exit(main())
