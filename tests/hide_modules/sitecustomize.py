"""On PYTHONPATH with ECHO_HIDE_MODULES="name ...", makes those packages unimportable in every Python
process started so: None in sys.modules is how Python spells "not installed" for import statements and
importlib.util.find_spec alike. Set at start-up, before any import, so that a library probing for one of
them (as transformers does for accelerate) finds it absent, as on a machine without it."""

import os
import sys

for _name in os.environ.get("ECHO_HIDE_MODULES", "").split():
    sys.modules[_name] = None
