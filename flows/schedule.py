"""Serve the pipeline flow on the cron schedule of params.yaml (needs a Prefect server).

PREFECT_SERVER_ANALYTICS_ENABLED=false prefect server start --host 127.0.0.1 --port 4200 &
export PREFECT_API_URL=http://127.0.0.1:4200/api
python -m flows.schedule            # blocks; runs `dvc repro` on schedule
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer
from prefect.schedules import Cron

import flows  # noqa: F401  (offline defaults first)
from deepalign.config import invalid, load_section
from flows.common import one_line_errors
from flows.pipeline import pipeline


@dataclass(frozen=True)
class ScheduleCfg:
    name: str  # deployment name: the flow runs as 'pipeline/<name>'
    cron: str
    timezone: str

    def __post_init__(self) -> None:
        try:
            Cron(self.cron)
        except ValueError as e:
            raise invalid("cron", self.cron, "five cron fields, e.g. '0 3 * * *'") from e
        try:
            ZoneInfo(self.timezone)
        except (ValueError, ZoneInfoNotFoundError) as e:
            raise invalid("timezone", self.timezone, "an IANA time zone, e.g. UTC") from e


def deployment(cfg: ScheduleCfg, workdir: Path, targets: list[str] | None = None):
    """The pipeline deployment with its cron schedule (register with .apply(), or serve)."""
    params = {"workdir": str(workdir.resolve()), "targets": targets or []}
    schedule = Cron(cfg.cron, timezone=cfg.timezone)
    return pipeline.to_deployment(name=cfg.name, schedule=schedule, parameters=params)


def main(params: Path = Path("params.yaml"), workdir: Path = Path(".")) -> None:
    """Register the scheduled deployment and serve it until interrupted."""
    from prefect import serve

    with one_line_errors():
        cfg = load_section("schedule", ScheduleCfg, params)
    serve(deployment(cfg, workdir))


if __name__ == "__main__":
    typer.run(main)
