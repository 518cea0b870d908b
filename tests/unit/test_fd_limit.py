"""The node raises its open-files soft limit to the hard one at start (p2pcache/node.py: raise_fd_limit)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_the_soft_limit_is_raised_to_the_hard_one_once() -> None:
    # In a child process, so this test's own limits stay as they are: lower the soft limit first (a fresh
    # machine's 1024, say), then raise it as the node does, twice.
    script = textwrap.dedent("""
        import json, resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        from p2pcache.node import raise_fd_limit
        first, again = raise_fd_limit(), raise_fd_limit()
        print(json.dumps([first, again, resource.getrlimit(resource.RLIMIT_NOFILE), hard]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    first, again, (soft_now, _), hard = json.loads(out)
    assert first is not None and first[0] == 256 and first[1] == soft_now > 256
    if hard != -1:  # RLIM_INFINITY: raised to the kernel's nr_open instead
        assert soft_now == hard
    assert again is None  # nothing left to do
