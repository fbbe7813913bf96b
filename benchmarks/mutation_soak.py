"""The mutation test at soak depth: many more damaged inputs per kind than CI runs (default 1000 per kind).

    python benchmarks/mutation_soak.py [EXAMPLES]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    n = sys.argv[1] if len(sys.argv) > 1 else "1000"
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, XPUC_MUTATION_EXAMPLES=n)
    test = root / "tests" / "compiler" / "test_mutation.py"
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", str(test)], env=env, cwd=root))
