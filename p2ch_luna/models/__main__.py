import sys

from p2ch_luna.models.cli import main

sys.exit(main())
