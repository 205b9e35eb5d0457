"""Put the repository root on sys.path so that `import supcon, data, linear_eval` works from tests/."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The method files, which share one training skeleton and are tested alike.
METHOD_FILES = ("supcon", "mlcl", "hmlc_gmm", "hmlc_attention")
