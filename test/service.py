"""Run k8svent.py as a real process, the way users run it."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

K8SVENT = Path(__file__).resolve().parent.parent / "k8svent.py"


class Service:
    """A k8svent process with its stdout and stderr in files."""

    def __init__(self, args, env, workdir, new_session=False):
        workdir.mkdir(parents=True, exist_ok=True)
        self.out_path = workdir / "stdout"
        self.err_path = workdir / "stderr"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(K8SVENT), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            # A session of its own is a terminal's foreground job: interrupt()
            # signals the whole group, k8svent's kubectl children included.
            start_new_session=new_session,
        )

    def log(self):
        return self.err_path.read_text(errors="replace")

    def stdout(self):
        return self.out_path.read_text(errors="replace")

    def count(self, pattern):
        return len(re.findall(pattern, self.log()))

    def wait_log(self, pattern, count=1, timeout=30):
        """Wait until `pattern` has appeared `count` times in the log."""
        deadline = time.monotonic() + timeout
        while self.count(pattern) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"k8svent exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {pattern!r} in log:\n{self.log()}")
            time.sleep(0.05)

    def wait_polls(self, count, timeout=30):
        """Wait until `count` successful polls (or lists) have finished (in all)."""
        self.wait_log(r"\b(?:poll|list|resync): \d+ pods seen", count, timeout)

    def polls(self):
        return self.count(r"\b(?:poll|list|resync): \d+ pods seen")

    def wait(self, timeout=30):
        """Wait for the process to exit; return its status."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    def stop(self, signum=signal.SIGTERM, timeout=30):
        """Signal the process and wait for it to exit; return its status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.wait(timeout)

    def interrupt(self, timeout=30):
        """Ctrl-C at a terminal: SIGINT to the process group (new_session=True); the status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        return self.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


def service_env(kubeconfig, extra=None):
    """The environment of a k8svent under test: our kubeconfig, no K8SVENT_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("K8SVENT_")}
    env["KUBECONFIG"] = str(kubeconfig)
    env.update(extra or {})
    return env


__all__ = ["Service", "service_env", "signal"]
