import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("PYTHONPATH", ROOT)
# under pytest-xdist (`-n 2`) the workers share the cores: one torch thread each, and for the
# processes they start
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest files, started first. `--dist loadfile` hands files out largest test count first,
# so these few-test files (about 9 and 6 minutes) would otherwise start last and be the suite's
# tail on two workers.
SLOW_FILES = ("test_slurm.py", "test_demo_run.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with :data:`SLOW_FILES` at the head of the queue."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SlowFilesFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            for slow in reversed(SLOW_FILES):
                for scope in [s for s in self.workqueue if s.endswith(slow)]:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return SlowFilesFirst(config, log)
