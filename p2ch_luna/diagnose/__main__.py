import sys

from p2ch_luna.diagnose.pipeline import main

sys.exit(main())
