"""What a training run tells its user: log lines (step, loss, lr, tokens/s, ETA) and a loss plot."""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressLog:
    """Accumulates per-step numbers and logs a line every `every` optimizer steps."""

    def __init__(self, total_steps: int, start_step: int, every: int):
        self.total_steps = total_steps
        self.start_step = start_step
        self.every = every
        self.started = time.perf_counter()
        self.window_started = self.started
        self.window_tokens = 0
        self.run_tokens = 0

    def step_done(self, step: int, loss: float, lr: float, tokens: int, history: list[dict]) -> None:
        """step is 1-based (the number of optimizer steps completed)."""
        now = time.perf_counter()
        self.window_tokens += tokens
        self.run_tokens += tokens
        elapsed = now - self.started
        record = {"step": step, "loss": round(loss, 6), "lr": lr, "tokens": tokens,
                  "elapsed_s": round(elapsed, 3)}
        history.append(record)
        if step % self.every and step != self.total_steps:
            return
        window = max(now - self.window_started, 1e-9)
        tokens_per_s = self.window_tokens / window
        done_here = step - self.start_step
        eta = elapsed / max(done_here, 1) * (self.total_steps - step)
        record["tokens_per_s"] = round(tokens_per_s, 1)
        log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  elapsed %s  ETA %s", step,
                 self.total_steps, loss, lr, tokens_per_s, format_duration(elapsed), format_duration(eta))
        self.window_started, self.window_tokens = now, 0

    @property
    def tokens_per_s(self) -> float:
        return self.run_tokens / max(time.perf_counter() - self.started, 1e-9)


def plot_loss(history: list[dict], evals: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss",
                color="tab:blue", linewidth=1)
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss",
                color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
