"""``python -m p2ch_luna.implant``: nodules implanted into a real CT (:mod:`p2ch_luna.synth.implant`)."""

import sys

from p2ch_luna.synth.implant import main

if __name__ == "__main__":
    sys.exit(main())
