import os
import subprocess
import sys
import time

from pipeline.data_priority import LOWEST_PRIORITY, lower_thread_priorities

THREADS = """
import threading, time
for _ in range(3):
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
print("up", flush=True)
time.sleep(30)
"""


def _nice(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[16])


def test_every_thread_of_the_process_gets_the_lowest_priority_and_none_is_raised():
    proc = subprocess.Popen([sys.executable, "-c", THREADS], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert len(tids) >= 4
        assert lower_thread_priorities(proc.pid) == len(tids)
        assert {_nice(proc.pid, t) for t in tids} == {LOWEST_PRIORITY}
        assert lower_thread_priorities(proc.pid, niceness=5) == 0  # never back up
        assert lower_thread_priorities(proc.pid) == 0  # already there
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.1)
    assert lower_thread_priorities(proc.pid) == 0  # a process that is gone: nothing, no error
