"""Run `tools/*.py` in fresh processes forked from one that has already imported torch (a zygote).

Every start of a tool pays ~2 s of `import torch` and ~2 s of `torch._dynamo` (which the first optimizer
pulls in) before it does anything, and the kill matrix starts about sixty. Here one server process imports
those once; each run is a `fork()` of it that sets the run's environment, working folder, argv and output
files and runs the script as `__main__`, then exits as the interpreter would (SystemExit's code, atexit
handlers, flushed streams). Each run is still its own process: SIGKILL ends it as it ends a tool started
from the shell, which is what the tests check. Only what the interpreter imported before the script starts
is shared; our modules read the environment when they run, not when they are imported (advcl_dist/faults.py).
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "torch._dynamo", "torchvision", "pyautoattack", "sklearn.datasets", "advcl_dist.pipeline",
           "advcl_dist.evaluate", "advcl_dist.cli")


class WarmTools:
    """The client: `run(tool, args, env)` → (exit code as subprocess gives it, stdout, stderr)."""

    def __init__(self, env: dict[str, str]):
        self.server = subprocess.Popen([sys.executable, __file__], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, bufsize=0)
        self.buffer = b""
        if self.reply(timeout=120) != "ready":
            raise RuntimeError("the warm tool server did not start")

    def reply(self, timeout: float) -> str:
        """The server's next line; unbuffered, so that select() sees every line not yet read."""
        while b"\n" not in self.buffer:
            if not select.select([self.server.stdout], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(self.server.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the warm tool server stopped (exit {self.server.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def run(self, tool: str, args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {"script": str(ROOT / "tools" / f"{tool}.py"), "args": args, "env": env, "cwd": str(ROOT),
                       "stdout": str(out), "stderr": str(err)}
            self.server.stdin.write(json.dumps(request).encode() + b"\n")
            pid = int(self.reply(timeout=30))
            try:
                code = int(self.reply(timeout))
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self.reply(timeout=30)
                command = f"tools/{tool}.py {' '.join(args)}"
                raise TimeoutError(f"{command} ran past {timeout} s:\n{err.read_text()}") from None
            return code, out.read_text(), err.read_text()

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


def _child(request: dict, channel: tuple) -> None:
    """In the forked process: become the tool's process, run it, exit as `python tools/x.py` would."""
    import atexit
    import runpy

    for fd in channel:
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
    os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = str(Path(request["script"]).parent)
    code = 0
    try:
        runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    for name in PRELOAD:
        __import__(name)  # an ImportError stops the server: the client says it did not start
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    channel = (requests.fileno(), replies.fileno())
    replies.write("ready\n")
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, channel)
        replies.write(f"{pid}\n")
        _, status = os.waitpid(pid, 0)
        replies.write(f"{os.waitstatus_to_exitcode(status)}\n")


if __name__ == "__main__":
    serve()
