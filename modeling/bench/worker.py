"""One CPU measurement in a fresh process: ``python -m minicpmv_attn.bench.worker TASK_JSON``.

Started by :func:`~.tasks.spawn_worker`; prints ``RESULT_TAG {json}`` (see :func:`~.tasks.worker_main`).
"""
import json
import sys

from .tasks import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(json.loads(sys.argv[1])))
