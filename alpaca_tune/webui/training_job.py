"""A training run started from the page: train.py itself in a child process, one at a time.

A child rather than a thread, so that Cancel is Ctrl-C for train.py (it then removes what it had
written, as on the command line) and the page's process never holds a second model. Its log lines
are read as they come; the step lines (step, loss, ETA) feed the progress bar and the loss plot.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..adapter_files import ARCHIVE_NAME
from ..base_model import PROJECT_ROOT
from ..settings import TrainSettings, to_args

STEP_LINE = re.compile(r"step (\d+)/(\d+)\s+loss ([0-9.]+).*?ETA (\S+)")
EVAL_LINE = re.compile(r"(?:final )?eval loss ([0-9.]+)")


@dataclass
class TrainingJob:
    output_dir: Path
    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    steps: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    total_steps: int = 0
    eta: str = ""
    cancelled: bool = False
    made_output_dir: bool = False  # the folder did not exist before this job

    @classmethod
    def start(cls, arguments: dict[str, object], output_dir: Path) -> TrainingJob:
        """train.py with these settings (TrainSettings fields; the rest at their defaults)."""
        settings = TrainSettings(**arguments, output_dir=str(output_dir))
        made = not output_dir.exists()
        command = [sys.executable, str(PROJECT_ROOT / "train.py"), *to_args(settings)]
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1)
        job = cls(output_dir, process, made_output_dir=made)
        threading.Thread(target=job._read, daemon=True).start()
        return job

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if match := STEP_LINE.search(line):
                self.steps.append((int(match.group(1)), float(match.group(3))))
                self.total_steps, self.eta = int(match.group(2)), match.group(4)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def archive(self) -> Path | None:
        path = self.output_dir / ARCHIVE_NAME
        return path if not self.running and self.process.returncode == 0 and path.is_file() else None

    def status(self) -> str:
        if self.running:
            done = self.steps[-1][0] if self.steps else 0
            return f"training: step {done}/{self.total_steps or '?'}, ETA {self.eta or '?'}"
        if self.cancelled:
            return "cancelled; nothing was kept"
        if self.archive:
            return f"done: {self.archive}"
        starts = [i for i, line in enumerate(self.lines) if line.startswith("error:")]
        if starts:  # the message and the lines it goes on with (bad records are listed below it)
            return "\n".join(self.lines[starts[-1]:starts[-1] + 12])
        return f"failed (exit status {self.process.returncode}); see the log"

    def fraction(self) -> float:
        if not self.steps or not self.total_steps:
            return 0.0 if self.running else 1.0
        return self.steps[-1][0] / self.total_steps

    def cancel(self, grace: float = 30) -> None:
        """Ctrl-C for train.py, which then removes what it had written, as on the command line.
        Sent again every 2 s until it ends, since Python drops a KeyboardInterrupt that lands
        while it runs a finalizer ("Exception ignored in ..."), and the run would train on. Past
        `grace` seconds it is killed, and its output folder, if the job made it, removed here."""
        if not self.running:
            return
        self.cancelled = True
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=min(2.0, max(0.0, deadline - time.monotonic())))
        if self.running:
            self.process.kill()
            self.process.wait()
            if self.made_output_dir:
                shutil.rmtree(self.output_dir, ignore_errors=True)
