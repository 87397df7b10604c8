import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# Nothing is downloaded by the test suite: bench.metrics never fetches the Inception weights (subprocesses inherit it).
os.environ["BENCH_OFFLINE"] = "1"
