"""deploy/check.py, run as its README says: every deploy file parses, the node args in the DaemonSet and the Helm
chart load with p2pcache's own settings loader. It once died on the cluster secret that only a node has."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_deploy_files_check_out() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "deploy" / "check.py")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "all deploy files check out" in r.stdout
