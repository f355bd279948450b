import sys

from p2ch_luna.synth.generator import main

sys.exit(main())
