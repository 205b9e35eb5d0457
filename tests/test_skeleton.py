"""The duplication we accept on purpose, and only it: the four method files share one skeleton (encoders,
projection head, gather, command line, loop) byte for byte, and the two HMLC files one `hmlc_loss`."""

import inspect
import os

import hmlc_attention
import hmlc_gmm
from conftest import METHOD_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKELETON_START = "# Encoders, projection head"


def skeleton(name):
    with open(os.path.join(ROOT, f"{name}.py")) as f:
        text = f.read()
    assert SKELETON_START in text, f"{name}.py lost its skeleton marker"
    return text[text.index(SKELETON_START):]


def test_the_method_files_share_one_skeleton():
    first = skeleton(METHOD_FILES[0])
    for name in METHOD_FILES[1:]:
        assert skeleton(name) == first, f"{name}.py's skeleton differs from {METHOD_FILES[0]}.py's: copy it over"


def test_the_hmlc_files_share_one_loss():
    assert inspect.getsource(hmlc_gmm.hmlc_loss) == inspect.getsource(hmlc_attention.hmlc_loss)
