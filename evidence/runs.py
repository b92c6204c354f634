"""Results of the experiments as JSON lines: one row per finished run, appended (several processes may append to one
file: each append holds an exclusive lock), read back by key so that a sweep resumes where it stopped and a later
sweep adds to it. Every row carries where and when it ran: card, commit, date, library versions."""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import subprocess
from pathlib import Path

import torch


def environment() -> dict:
    """The fields every row records: the card (or 'cpu'), the git commit (with '-dirty' for a changed tree), the
    date (UTC), whether Triton autotuned (``MOM_WRAP_FIRST_CONFIG``: each kernel's first config), and the versions of torch, triton, fla and mamba-ssm (None where missing)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args) -> str | None:
        try:
            return subprocess.run(['git', *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git('rev-parse', 'HEAD')
    if commit and git('status', '--porcelain', '--untracked-files=no'):
        commit += '-dirty'
    commit = commit or os.environ.get('MOM_WRAP_COMMIT')  # a copy of the tree without .git (the GPU machine)
    versions = {}
    for name in ('triton', 'fla', 'mamba_ssm'):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 (not installed, or no __version__)
            versions[name] = None
    return {'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'commit': commit,
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'triton_configs': 'first' if os.environ.get('MOM_WRAP_FIRST_CONFIG') == '1' else 'autotuned',
            'torch': torch.__version__, **versions}


def triton_setup(first_config: bool) -> None:
    """``first_config`` (or ``MOM_WRAP_FIRST_CONFIG=1`` in the environment, which child processes inherit): every
    Triton kernel runs its first config instead of autotuning (``mom_wrap.interpret.first_config_only``). The
    models here are small enough that their steps are launch-bound, and a fresh GPU otherwise spends minutes per
    shape autotuning fla's kernels in every process of a sweep. The rows record which it was."""
    if first_config or os.environ.get('MOM_WRAP_FIRST_CONFIG') == '1':
        os.environ['MOM_WRAP_FIRST_CONFIG'] = '1'
        from mom_wrap.interpret import first_config_only
        first_config_only()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Every row of ``path`` (none if it does not exist); a torn last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def complete(row: dict) -> bool:
    """Whether the row's run went its whole length (one stopped at its time limit, ``complete`` false, is to be run
    again and stays out of the figures)."""
    return row.get('complete', True)


def done(path: str | os.PathLike) -> set[str]:
    """The ``run_id`` of every complete row in ``path``."""
    return {row['run_id'] for row in read_rows(path) if 'run_id' in row and complete(row)}


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append ``row`` (which must have a ``run_id``) to ``path`` as one JSON line, under an exclusive lock."""
    if 'run_id' not in row:
        raise ValueError("row: needs a 'run_id'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, sort_keys=True) + '\n'
    with open(path, 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
