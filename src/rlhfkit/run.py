"""The run directory every stage writes: ``<output_dir>/<name>/``::

    config.yaml         the resolved config
    manifest.json       stage, status, inputs with hashes, package versions, parent runs
    metrics.jsonl       one JSON object per logged step
    checkpoints/
      step-00000050/    model, optimiser, scheduler and RNG state (accelerate), trainer_state.json
      latest            the name of the newest complete checkpoint
    final/              the trained model in Hugging Face format
    tensorboard/        with --report-to tensorboard (wandb, mlflow and trackio log to their own stores)

Checkpoints are written to a temporary folder and renamed, so a crash at any moment leaves the last
good checkpoint intact. ``--resume`` reloads it and truncates ``metrics.jsonl`` back to its step, so
a resumed run ends exactly as an uninterrupted one.

``metrics.jsonl`` is always written; ``--report-to`` also sends every logged step to an experiment
tracker through accelerate's tracker classes (TensorBoard, Weights & Biases, MLflow, trackio).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import numbers
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from rlhfkit import config as _config
from rlhfkit.errors import ConfigError

PACKAGES = ("rlhfkit", "torch", "transformers", "accelerate", "peft", "safetensors", "tyro")


class NonFiniteError(RuntimeError):
    """A NaN or inf loss, reward or gradient: the run stops and its last good checkpoint stays."""


def check_finite(step: int, **values) -> None:
    """Raise :class:`NonFiniteError` if any value is NaN or inf."""
    plain = {k: float(v.detach()) if hasattr(v, "detach") else float(v) for k, v in values.items()}
    bad = {k: v for k, v in plain.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteError(f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}")


def main_process_value(value):
    """``value`` as the main process has it, on every process of a launch (itself when there is one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def file_digest(path: str | Path) -> dict:
    """sha256 of a file, or of a folder's file names, sizes and small-file contents."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return {"path": str(path), "sha256": h.hexdigest(), "bytes": path.stat().st_size}
    if path.is_dir():
        total = 0
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            size = p.stat().st_size
            total += size
            h.update(f"{p.relative_to(path)}:{size}\n".encode())
            if size < (1 << 20):
                h.update(p.read_bytes())
        return {"path": str(path), "sha256": h.hexdigest(), "bytes": total}
    return {"path": str(path), "sha256": None}


def parent_run(path: str | Path) -> str | None:
    """The run directory that produced ``path``, if it lies inside one."""
    p = Path(path).resolve()
    for folder in [p, *p.parents]:
        if (folder / "manifest.json").is_file() and (folder / "config.yaml").is_file():
            return str(folder)
    return None


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


RESULT_KEYS = ("loss", "accuracy", "score", "kl", "response_length")  # what a stage's result block shows


class Run:
    """One stage's run directory. Only the main process writes; every process may call."""

    def __init__(self, path: Path, stage: str, is_main: bool = True, keep: int = 2):
        self.path = path
        self.keep = keep
        self.stage = stage
        self.is_main = is_main
        self.ckpt_dir = path / "checkpoints"
        self.final_dir = path / "final"
        self._t0 = time.time()
        self.trackers: list = []

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg, stage: str, inputs: dict[str, str] | None = None, is_main: bool = True) -> Run:
        """Create (or, with ``cfg.resume``, reopen) the run directory for ``cfg``."""
        root = Path(cfg.output_dir)
        name = cfg.name
        if not name and cfg.resume:
            name = cls.newest_unfinished(root, stage)
            if name is None:
                raise ConfigError(f"--resume: no unfinished {stage} run in {root}; pass --name")
            cfg.name = name
        if not name:  # the main process's clock names it: the others may have passed a second already
            name = cfg.name = main_process_value(f"{stage}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        run = cls(root / name, stage, is_main)
        run.keep = max(1, cfg.keep_checkpoints)
        saved = run.path / "config.yaml"
        if cfg.resume:
            if not saved.is_file():
                raise ConfigError(f"--resume: {run.path} has no config.yaml; nothing to resume")
            run._check_same_config(cfg)
        elif run.holds_results():
            raise ConfigError(f"run directory {run.path} already exists; pass --resume to continue it "
                             f"or choose another --name")
        elif is_main and run.path.is_dir() and any(run.path.iterdir()):
            print(f"reusing {run.path}: the run there stopped before its first step (no metrics, checkpoint or model)")
        if is_main:
            run.path.mkdir(parents=True, exist_ok=True)
            if not cfg.resume:
                _atomic_write(saved, _config.dump(cfg))
            manifest = run.manifest() if cfg.resume else {}
            manifest.update({
                "stage": stage,
                "status": "running",
                "created": manifest.get("created", _dt.datetime.now().isoformat(timespec="seconds")),
                "argv": sys.argv,
                "versions": _versions(),
            })
            if inputs is not None or "inputs" not in manifest:
                found = {k: v for k, v in (inputs or {}).items() if v}
                manifest["inputs"] = {k: file_digest(v) if Path(v).exists() else {"spec": v} for k, v in found.items()}
                manifest["parents"] = sorted({p for v in found.values() if (p := parent_run(v))} - {str(run.path.resolve())})
            run.write_manifest(manifest)
            run.trackers = open_trackers(getattr(cfg, "report_to", "none"), run.path, cfg)
        return run

    @staticmethod
    def newest_unfinished(root: Path, stage: str) -> str | None:
        best = None
        for manifest in root.glob("*/manifest.json"):
            try:
                m = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if m.get("stage") == stage and m.get("status") != "finished":
                if best is None or manifest.stat().st_mtime > best.stat().st_mtime:
                    best = manifest
        return best.parent.name if best else None

    def _check_same_config(self, cfg) -> None:
        saved = yaml.safe_load((self.path / "config.yaml").read_text())
        now = _config.to_dict(cfg)
        ignore = {"resume", "name", "progress", "verbose"}
        diff = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
        if diff:
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
            raise ConfigError(f"--resume with a different config than {self.path}/config.yaml ({detail})")

    # -- manifest and metrics -------------------------------------------------------------------

    def manifest(self) -> dict:
        path = self.path / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_manifest(self, manifest: dict) -> None:
        if self.is_main:
            _atomic_write(self.path / "manifest.json", json.dumps(manifest, indent=2, default=str))

    def update_manifest(self, **fields) -> None:
        if self.is_main:
            m = self.manifest()
            m.update(fields)
            self.write_manifest(m)

    def log(self, step: int, **metrics) -> None:
        """Append one line to metrics.jsonl (flushed at once, so a crash loses nothing logged)."""
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time() - self._t0, 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def result(self) -> str:
        """The short block a stage prints at its end: where the run is, its steps and time, and the latest
        value of each headline metric it logged (training loss and accuracy, reward and KL, held-out figures).

        >>> import tempfile; run = Run(Path(tempfile.mkdtemp()), "sft")
        >>> run.log(1, loss=2.0, lr=1e-5); run.log(2, loss=1.5, eval_loss=1.75)
        >>> print(run.result().replace(str(run.path), "RUN"))  # doctest: +ELLIPSIS
        done: RUN (2 steps, ... s)
          loss 1.5  eval_loss 1.75
        """
        latest: dict = {}
        for row in self.metrics():
            latest.update(row)
        shown = [f"{k} {latest[k]:.4g}" for k in latest
                 if (k in RESULT_KEYS or k.startswith(("eval_", "heldout_"))) and isinstance(latest[k], (int, float))
                 and not isinstance(latest[k], bool)]
        head = f"done: {self.path} ({latest.get('step', 0)} steps, {latest.get('time', 0.0):.0f} s)"
        return head + ("\n  " + "  ".join(shown) if shown else "")

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _truncate_metrics(self, step: int) -> None:
        if self.is_main:
            kept = [m for m in self.metrics() if m.get("step", 0) <= step]
            _atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))

    # -- checkpoints ----------------------------------------------------------------------------

    def holds_results(self) -> bool:
        """Whether the directory holds what a new run would lose: logged steps, a checkpoint or a final
        model. A run that failed while loading its model or data leaves only its config and manifest."""
        metrics = self.path / "metrics.jsonl"
        return ((metrics.is_file() and metrics.stat().st_size > 0) or self.final_dir.exists()
                or any(self.ckpt_dir.glob("step-*")))

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if pointer.is_file():
            path = self.ckpt_dir / pointer.read_text().strip()
            if (path / "trainer_state.json").is_file():
                return path
        complete = sorted(p for p in self.ckpt_dir.glob("step-*") if (p / "trainer_state.json").is_file())
        return complete[-1] if complete else None

    def save_checkpoint(self, accelerator, step: int, state: dict | None = None) -> Path:
        """Write model, optimiser, scheduler and RNG state atomically (temp folder, then rename)."""
        final = self.ckpt_dir / f"step-{step:08d}"
        tmp = self.ckpt_dir / f".tmp-step-{step:08d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if self.is_main:
            _atomic_write(tmp / "trainer_state.json", json.dumps({"step": step, **(state or {})}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            _atomic_write(self.ckpt_dir / "latest", final.name)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        keep = self.keep
        complete = sorted(p for p in self.ckpt_dir.glob("step-*") if (p / "trainer_state.json").is_file())
        for old in complete[: max(0, len(complete) - keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, accelerator) -> dict:
        """Restore the last good checkpoint into the prepared objects; returns its trainer state
        (``{"step": 0}`` when there is none). Logged metrics after that step are dropped."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            self._truncate_metrics(0)
            return {"step": 0}
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        self._truncate_metrics(state["step"])
        accelerator.wait_for_everyone()
        return state

    # -- the end --------------------------------------------------------------------------------

    def save_final(self, save) -> Path:
        """``save(folder)`` writes the Hugging Face model; it lands in ``final/`` atomically."""
        tmp = self.path / ".tmp-final"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        save(tmp)
        if self.is_main:
            shutil.rmtree(self.final_dir, ignore_errors=True)
            os.rename(tmp, self.final_dir)
        return self.final_dir

    def finish(self, **summary) -> None:
        self.update_manifest(status="finished", finished=_dt.datetime.now().isoformat(timespec="seconds"),
                             summary={k: _plain(v) for k, v in summary.items()})
        self.close_trackers()

    def fail(self, reason: str) -> None:
        ckpt = self.latest_checkpoint()
        self.update_manifest(status="failed", error=reason, last_good_checkpoint=str(ckpt) if ckpt else None)
        self.close_trackers()

    def close_trackers(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "trackio")


def open_trackers(report_to: str, path: Path, cfg) -> list:
    """accelerate's tracker for ``report_to`` (none, tensorboard, wandb, mlflow, trackio), started, with
    the run's config stored as its hyperparameters. TensorBoard writes to ``<run>/tensorboard``; the
    others log to their own stores under the run's name."""
    if report_to == "none":
        return []
    if report_to not in REPORT_TO[1:]:
        raise ConfigError(f"--report-to {report_to!r}: expected one of {', '.join(REPORT_TO)}")
    cls = LOGGER_TYPE_TO_CLASS[report_to]
    try:
        tracker = cls("tensorboard", path) if cls.requires_logging_directory else cls(path.name)
        tracker.start()
    except ImportError as e:
        raise ConfigError(f"--report-to {report_to}: its package is not installed ({e}); "
                          f"pip install {report_to}") from None
    hparams = {k: v for k, v in _config.to_dict(cfg).items() if isinstance(v, (bool, int, float, str))}
    tracker.store_init_configuration(hparams)
    return [tracker]


def progress(iterable, enabled: bool, desc: str, initial: int = 0, total: int | None = None):
    """A tqdm bar with ETA on the main process; the plain iterable elsewhere."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, initial=initial, total=total, dynamic_ncols=True)


def _plain(value):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
