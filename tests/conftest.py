import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("PYTHONPATH", ROOT)
# under pytest-xdist (`-n 2`) the workers share the cores: one torch thread each, and for the
# processes they start
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# the longest files first, so that two workers finish together (loadfile hands out whole files
# in collection order): the real-Slurm jobs and the 800-step demo run take minutes each
SLOW_FILES = ("test_slurm.py", "test_demo_run.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: every file keeps its own order
