import sys

from p2ch_luna.serve.cli import main

sys.exit(main())
