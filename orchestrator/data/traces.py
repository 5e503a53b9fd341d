"""Availability traces: per edge, the intervals it is online, with its compute speed and bandwidth there.

A trace is a table (CSV or Parquet) with columns `edge_id, start_s, end_s, speed, bandwidth_mbps`; each
row is one online interval in simulated seconds, the gaps between an edge's rows are offline. `speed`
multiplies the edge's compute rate (1: nominal), `bandwidth_mbps` (empty / null: the edge's own link)
replaces its link bandwidth while the interval lasts. The virtual clock replays it
(orchestrator.runtime.virtual_clock); `synthesise_trace` draws one from a few parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from orchestrator.core.errors import ScenarioError

COLUMNS = ("edge_id", "start_s", "end_s", "speed", "bandwidth_mbps")


@dataclass(frozen=True)
class OnlineInterval:
    edge_id: str
    start_s: float
    end_s: float
    speed: float = 1.0
    bandwidth_mbps: float | None = None


def read_trace(path: str | Path) -> list[OnlineInterval]:
    """The trace's rows, checked: ScenarioError names the file, the row and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"traces.path: {path}: no such file")
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pa_csv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ScenarioError(f"traces.path: {path}: cannot read it as {path.suffix or 'CSV'}: {err}") from None
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise ScenarioError(
            f"traces.path: {path}: missing column(s) {', '.join(missing)}; expected {COLUMNS}"
        )
    columns = {name: table.column(name).to_pylist() for name in COLUMNS}
    rows: list[OnlineInterval] = []
    last_end: dict[str, float] = {}
    for i in range(table.num_rows):
        where = f"traces.path: {path}: row {i + 1}"
        edge_id, start, end, speed, bandwidth = (columns[name][i] for name in COLUMNS)
        if not isinstance(edge_id, str) or not edge_id:
            raise ScenarioError(f"{where}: edge_id must be a non-empty string, received {edge_id!r}")
        numbers = {"start_s": start, "end_s": end, "speed": speed}
        for name, value in numbers.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ScenarioError(f"{where}: {name} must be a finite number, received {value!r}")
        if not 0 <= start < end:
            raise ScenarioError(f"{where}: expected 0 <= start_s < end_s, received {start} and {end}")
        if speed <= 0:
            raise ScenarioError(f"{where}: speed must be > 0, received {speed}")
        if bandwidth is not None and not (isinstance(bandwidth, int | float) and bandwidth > 0):
            raise ScenarioError(f"{where}: bandwidth_mbps must be > 0 or empty, received {bandwidth!r}")
        if start < last_end.get(edge_id, 0.0):
            raise ScenarioError(f"{where}: edge {edge_id!r} overlaps or precedes its previous interval")
        last_end[edge_id] = float(end)
        rows.append(OnlineInterval(edge_id, float(start), float(end), float(speed),
                                   None if bandwidth is None else float(bandwidth)))  # fmt: skip
    return rows


def write_trace(rows: Sequence[OnlineInterval], path: str | Path) -> Path:
    """Write `rows` as CSV or Parquet (by the file's suffix)."""
    path = Path(path)
    table = pa.table({
        "edge_id": pa.array([r.edge_id for r in rows], pa.string()),
        "start_s": pa.array([r.start_s for r in rows], pa.float64()),
        "end_s": pa.array([r.end_s for r in rows], pa.float64()),
        "speed": pa.array([r.speed for r in rows], pa.float64()),
        "bandwidth_mbps": pa.array([r.bandwidth_mbps for r in rows], pa.float64()),
    })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        pa_csv.write_csv(table, path)
    return path


def synthesise_trace(
    edge_ids: Sequence[str],
    *,
    hours: float,
    seed: int,
    period_hours: float = 24.0,
    mean_online: float = 0.7,
    diurnal_amplitude: float = 0.25,
    session_minutes: float = 20.0,
    dropout_rate: float = 0.0,
    speed_sigma: float = 0.5,
    bandwidth_mbps: tuple[float, float] | None = None,
) -> list[OnlineInterval]:
    """A seeded synthetic trace.

    Time is cut into sessions of `session_minutes`; an edge is online in a session with probability
    `mean_online + diurnal_amplitude * sin(2 pi (t / period + phase))`, its phase drawn per edge (time zones).
    Each edge has a lognormal speed (median 1, sigma `speed_sigma`) and, when `bandwidth_mbps` = (low, high),
    a log-uniform bandwidth. With probability `dropout_rate` an edge drops out for good at a uniform time.
    Adjacent online sessions merge into one interval.
    """
    if hours <= 0 or session_minutes <= 0:
        raise ValueError(f"hours and session_minutes must be > 0, received {hours} and {session_minutes}")
    if not 0 <= dropout_rate <= 1 or not 0 <= mean_online <= 1:
        raise ValueError(
            f"dropout_rate and mean_online must be in [0, 1], received {dropout_rate}, {mean_online}"
        )
    rng = np.random.default_rng(seed)
    session = session_minutes * 60.0
    horizon = hours * 3600.0
    starts = np.arange(0.0, horizon, session)
    rows: list[OnlineInterval] = []
    for edge_id in edge_ids:
        phase = rng.uniform()
        speed = float(rng.lognormal(0.0, speed_sigma)) if speed_sigma > 0 else 1.0
        bandwidth = None
        if bandwidth_mbps is not None:
            low, high = bandwidth_mbps
            bandwidth = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        online_p = mean_online + diurnal_amplitude * np.sin(
            2 * np.pi * (starts / (period_hours * 3600) + phase)
        )
        online = rng.uniform(size=len(starts)) < np.clip(online_p, 0.0, 1.0)
        gone_at = float(rng.uniform(0.0, horizon)) if rng.uniform() < dropout_rate else horizon
        begin: float | None = None
        for start, is_online in zip(starts, online, strict=True):
            end = min(float(start) + session, gone_at)
            if is_online and start < gone_at:
                begin = float(start) if begin is None else begin
                last = end
                continue
            if begin is not None:
                rows.append(OnlineInterval(edge_id, begin, last, speed, bandwidth))
                begin = None
        if begin is not None:
            rows.append(OnlineInterval(edge_id, begin, last, speed, bandwidth))
    return rows
