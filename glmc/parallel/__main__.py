"""`python -m glmc.parallel`: one worker rank of a tensor-parallel model (started by glmc.parallel.backend)."""

import os
import sys

from glmc.parallel.ranks import worker_main

code = worker_main()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # not SystemExit: the parent-watching thread is blocked in a read of stdin
