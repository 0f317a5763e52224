"""A watchdog beside the Triton Python stub that kills the stub when tritonserver is gone.

The stub notices a dead parent itself, but can then deadlock on the GIL (seen: Triton stopped right
after a model load left an orphan stub holding ~400 MB that ignores SIGTERM). So the watchdog is a
shell loop, no Python: if the stub's parent changes and the stub is still there 3 s later, kill -9.
"""

from __future__ import annotations

import os
import subprocess

_SCRIPT = r"""
ppid() { set -- $(sed 's/.*) //' /proc/$1/stat 2>/dev/null); echo "$2"; }
while [ "$(ppid $STUB)" = "$PARENT" ]; do sleep 1; done
[ -d /proc/$STUB ] || exit 0
sleep 3
if [ -d /proc/$STUB ] && [ "$(ppid $STUB)" != "$PARENT" ]; then kill -9 $STUB; fi
"""


def start_watchdog() -> None:
    subprocess.Popen(
        ["/bin/sh", "-c", _SCRIPT],
        env={"STUB": str(os.getpid()), "PARENT": str(os.getppid()), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
