"""``python -m rlkv_vllm.bench --child ...``: the supervisor's command line for one config's process."""

import sys

from .driver import child_main

sys.exit(child_main(sys.argv[1:]))
