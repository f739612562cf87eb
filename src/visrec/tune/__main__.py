"""`python -m visrec.tune --storage URL --study NAME`: one worker process."""

from .worker import worker_main

worker_main()
