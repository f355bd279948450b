import sys

from p2ch_luna.export.cli import main

sys.exit(main())
