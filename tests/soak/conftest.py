import os
import sys

# the soak lives in the bench package at the repository root (it is also part of `make bench`)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
