"""Run a script as one rank of a launch, after a delay chosen per rank: the ranks of one run
then start in different seconds on purpose (tests/test_run_dir.py).

    torchrun --nproc_per_node 2 tests/delayed_ranks.py 0,1.5 train.py ARGS...   # rank 1 starts 1.5 s later
"""

import os
import runpy
import sys
import time

delays, script, *args = sys.argv[1:]
time.sleep(float(delays.split(",")[int(os.environ["LOCAL_RANK"])]))
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
