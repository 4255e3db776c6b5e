"""`python tests/train_poisoned.py STEP RANK ARGS...`: python -m echo.train ARGS with NaN logits at the
0-based step STEP on process RANK of a torchrun only. Every process has to skip that step all the same."""

import os
import sys

from train_cases import poisoned

from echo import Echo, train

if __name__ == "__main__":
    step, rank = int(sys.argv[1]), int(sys.argv[2])
    if int(os.environ.get("RANK", "0")) == rank:
        Echo.forward = poisoned(Echo.forward, {step})
    sys.exit(train.main(sys.argv[3:]))
