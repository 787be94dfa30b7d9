"""The SIGKILL soak: `charlm train` killed at random moments, resumed, and checked (the run dir
always loads, the run ends as an uninterrupted one would). Its plumbing lives in tests/soak.py,
which tests/artifacts/test_crash_safety.py runs short; this is the long run, for a developer:

    python scripts/soak.py                       # 20 kills of a 1000-step run; see --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from soak import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
