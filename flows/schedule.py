"""Serve the pipeline flow on the cron schedule of params.yaml (needs a Prefect server).

prefect server start --host 127.0.0.1 --port 4200 &
export PREFECT_API_URL=http://127.0.0.1:4200/api
python -m flows.schedule            # blocks; runs `dvc repro` on schedule
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer
from prefect.schedules import Cron

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import load_section
from flows.pipeline import pipeline


@dataclass(frozen=True)
class ScheduleCfg:
    name: str  # deployment name: the flow runs as 'pipeline/<name>'
    cron: str
    timezone: str


def deployment(cfg: ScheduleCfg, workdir: Path, targets: list[str] | None = None):
    """The pipeline deployment with its cron schedule (register with .apply(), or serve)."""
    params = {"workdir": str(workdir.resolve()), "targets": targets or []}
    schedule = Cron(cfg.cron, timezone=cfg.timezone)
    return pipeline.to_deployment(name=cfg.name, schedule=schedule, parameters=params)


def main(params: Path = Path("params.yaml"), workdir: Path = Path(".")) -> None:
    """Register the scheduled deployment and serve it until interrupted."""
    from prefect import serve

    serve(deployment(load_section("schedule", ScheduleCfg, params), workdir))


if __name__ == "__main__":
    typer.run(main)
