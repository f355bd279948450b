import sys

from p2ch_luna.commands import main

sys.exit(main())
