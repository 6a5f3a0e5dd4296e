"""The campaign lock: re-entrant across this process's threads, refused to another process with the holder named,
free again once released."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from pixelpick.locking import campaign_lock, holds

REPO = Path(__file__).resolve().parents[1]
TRY_LOCK = "from pixelpick.locking import campaign_lock\nwith campaign_lock({path!r}, 'tiny'): print('taken')"


def other_process_takes(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", TRY_LOCK.format(path=str(path))], env=env, capture_output=True,
                          text=True)


def test_the_lock_is_reentrant_across_threads_and_refused_to_another_process(tmp_path):
    path = tmp_path / "campaign" / ".lock"
    with campaign_lock(path, "tiny"):
        inside = []

        def step():
            with campaign_lock(path, "tiny"):
                inside.append(holds(path))

        thread = threading.Thread(target=step)
        thread.start()
        thread.join()
        assert inside == [True] and holds(path)  # the inner release did not free the outer hold

        refused = other_process_takes(path)
        assert refused.returncode != 0
        assert f"campaign 'tiny' is already being run by pid {os.getpid()} on " in refused.stderr
    assert not holds(path)
    assert other_process_takes(path).stdout.strip() == "taken"
