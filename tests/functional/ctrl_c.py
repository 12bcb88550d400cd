"""Starting a command that Ctrl-C must reach, whatever the suite was started from."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def popen_interruptible(*args: Any, **kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen with SIGINT at its default in the child. A process inherits an ignored SIGINT
    through exec (a shell ignores it for a job it starts in the background, as a suite run with `&`), and
    Python then installs no KeyboardInterrupt: the command would never see the test's Ctrl-C. A handler,
    unlike SIG_IGN, is reset to the default by exec, so one is set around the start."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(*args, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)
