"""Run logging: metrics.jsonl (what tests and tools read), a console progress bar, and Weights & Biases.

W&B is imported lazily (GPU images may not have it). `wandb.mode`: offline (default; files under
runs/<name>/wandb, upload later with `wandb sync`), online (needs an API key in WANDB_API_KEY or from
`wandb login`), disabled. The run id is stored in checkpoints so a resumed run continues the same
W&B run. The API key is never read into our own logs or files.

W&B buffers what it is given (its offline file grows in 32 KiB blocks), so a killed process loses the tail of
its W&B history while metrics.jsonl, flushed line by line, keeps it. A W&B segment that ends cleanly records
the last step it logged in wandb/logged_through; a resumed run replays from metrics.jsonl every record after
that step, up to the step it resumes from, so W&B ends up with the whole history (W&B drops a step it already
has, so what the killed segment did save is not doubled).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrackingError(RuntimeError):
    pass


def _clean(v: Any) -> Any:
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsFile:
    """Append-only JSON lines; on resume, lines past the restored step are dropped (those steps run again and
    log again). A fresh run appends too: the run directory's history check keeps a fresh run from meeting an
    old file."""

    def __init__(self, path: Path | None, resume_step: int | None):
        """`path` None: records go nowhere (the processes of a multi-process run other than process 0)."""
        self.path = path
        self.f = None
        if path is None:
            return
        if resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.f = path.open("a")

    def write(self, record: dict) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def new_run_id() -> str:
    return secrets.token_hex(4)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        rc = netrc.netrc()
        return any(h in rc.hosts for h in ("api.wandb.ai",))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _unreachable(wandb, timeout: float) -> str | None:
    """Why the W&B server (its configured base URL) does not accept a TCP connection within `timeout`, or None
    when it does."""
    url = wandb.setup().settings.base_url
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{url} unreachable: {e.strerror or type(e).__name__}"


class WandbRun:
    """A thin W&B wrapper; a no-op when mode is disabled."""

    def __init__(self, cfg, run_dir: Path, run_id: str, config: dict):
        self.run = None
        self.mode = cfg.mode
        self.ledger = run_dir / "wandb" / "logged_through"
        self.last_step: int | None = None
        if cfg.mode == "disabled":
            return
        if cfg.mode == "online" and not _has_wandb_key():
            raise TrackingError("wandb.mode=online but no W&B API key was found: set WANDB_API_KEY or run "
                               "`wandb login`, or use --set wandb.mode=offline")
        try:
            import wandb
        except ImportError:
            raise TrackingError("wandb is not installed: `pip install wandb`, or use --set wandb.mode=disabled") from None
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        kwargs = dict(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags) or None,
                      name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config)
        if cfg.mode != "online":
            error = self._init_retrying(wandb, cfg.mode, kwargs)
            if error is not None:
                print(f"warning: W&B {cfg.mode} init failed ({error}); continuing without W&B (metrics.jsonl has "
                      "every record, and the next resume replays them into W&B)", file=sys.stderr, flush=True)
            return
        # An unreachable server must not stall the run: W&B's own default waits 90 s without a word. After 30 s
        # ($WANDB_INIT_TIMEOUT overrides) the run continues offline, and `wandb sync` uploads it later.
        try:
            timeout = float(os.environ.get("WANDB_INIT_TIMEOUT") or 30.0)
        except ValueError:
            timeout = 30.0
        # A server that does not even accept a connection is found out before W&B's service starts an online run:
        # a failed online init holds the run id in that service for longer than a run should wait, and an
        # offline run under the same id is refused meanwhile ("run ID ... is in use").
        reason = _unreachable(wandb, timeout)
        if reason is None:
            try:
                self.run = wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout), **kwargs)
                return
            except Exception as e:  # W&B's classes vary (wandb.errors.*, TimeoutError, ServerResponseError)
                reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        self.mode = "offline"
        # After a failed online init, W&B's service is torn down and the run retried offline.
        self._init_retrying(wandb, "offline", kwargs, teardown_first=True)
        where = (f"continuing offline, upload later with `wandb sync {run_dir / 'wandb'}/offline-run-*`"
                 if self.run is not None else "continuing without W&B (metrics.jsonl has every record)")
        print(f"warning: W&B online init failed within {timeout:g} s ({reason}); {where}", file=sys.stderr, flush=True)

    def _init_retrying(self, wandb, mode: str, kwargs: dict, *, teardown_first: bool = False) -> str | None:
        """wandb.init in `mode`, three tries, W&B's service torn down before each retry: a run id can stay "in
        use" for a few seconds in the service of a failed init or of a killed process this run resumes. Sets
        self.run; returns None, or the last error when W&B could not start (the run then trains without it:
        metrics.jsonl has everything, and the next resume replays into W&B what this segment did not log)."""
        error = None
        for attempt in range(3):
            if attempt or teardown_first:
                wandb.teardown()
            try:
                self.run = wandb.init(mode=mode, **kwargs)
                return None
            except Exception as e:  # W&B's classes vary (ServerResponseError, CommError, ...)
                error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
                time.sleep(1.0 + attempt)
        return error

    def log(self, record: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step)
            self.last_step = step if self.last_step is None else max(self.last_step, step)

    def replay(self, records: list[dict], through_step: int) -> int:
        """Log the metrics.jsonl `records` that W&B may have lost: those after the last step a cleanly finished
        segment logged, up to `through_step`. Returns how many were logged."""
        if self.run is None:
            return 0
        durable = int(self.ledger.read_text()) if self.ledger.is_file() else 0
        lost = [r for r in records if durable < r.get("step", 0) <= through_step]
        for r in lost:
            self.log(r, r["step"])
        return len(lost)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        if self.run is not None:
            self.run.log({key: self.wandb.Image(str(path))}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
            if self.last_step is not None:
                tmp = self.ledger.with_suffix(".tmp")
                tmp.write_text(str(self.last_step))
                tmp.replace(self.ledger)

    @property
    def dir(self) -> str | None:
        return None if self.run is None else self.run.dir


def save_heatmap(rows: dict[str, list[float]], path: Path, *, title: str, xlabel: str) -> Path:
    """A labelled rows x columns heatmap of values in [0, 1], each cell annotated, as a PNG; rows may differ
    in length (missing cells stay blank)."""
    import numpy as np
    from matplotlib.figure import Figure

    width = max(len(v) for v in rows.values())
    grid = np.full((len(rows), width), np.nan)
    for i, values in enumerate(rows.values()):
        grid[i, :len(values)] = values
    fig = Figure(figsize=(max(4.5, 2.5 + 0.55 * width), 1.4 + 0.45 * len(rows)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(width))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110)
    return path


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal,
    )
