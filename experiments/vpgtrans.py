"""VPGTrans speed-up in miniature; the same as `vlkit experiment vpgtrans` (see vlkit/experiments/vpgtrans.py).

    python experiments/vpgtrans.py [--out runs/vpgtrans] [--bench runs/bench] [--seeds 3]
"""

import sys

from vlkit.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "experiment", "vpgtrans", *sys.argv[1:]]
    main()
