"""Live metrics for Prometheus: every node serves `/metrics` while the run trains.

`monitor.prometheus_port=PORT` (0 = off) starts one exporter per node, in the process with local
rank 0: prometheus-client's HTTP server in a daemon thread with its own registry (never the
process-global one), bound to `monitor.prometheus_address` on the first free port of
[PORT, PORT + monitor.prometheus_port_count), so that several nodes or jobs sharing a host each
get one. Each node logs the URL it serves. Every series is named `train_*` and carries the run's
labels: run (the run id, the same on every restart), cluster, model, parallel; per-rank series
add rank and node.

What a node serves, all of it built when Prometheus scrapes (the training thread's cost is one
reference stored per metrics row):

- Rank 0's node: the run-level values of the latest metrics row and of the latest committed
  checkpoint. Its exporter is a Tracker (train/trackers.py) that MetricsLogger feeds like any
  other. The checkpoint's commit time is served both as a timestamp (`time() - x` in PromQL)
  and as an age computed at scrape time on rank 0's clock, which needs no agreement between
  Prometheus's clock and the node's.
- Every node: the heartbeat age and own time per step (train/stragglers.py) of its own ranks,
  and of rank 0, so that a frozen rank 0, whose exporter freezes with it, still shows from the
  other nodes. A poller thread reads those ranks' beats from the rendezvous store
  (train/heartbeat.py) every half heartbeat interval and notes, on this node's clock, when each
  counter last moved: the age is the time since then (the nodes' clocks need not agree). A
  live rank's age stays under about 1.5 x `trainer.heartbeat_interval_s`; a frozen or dead one's
  grows. A scrape never waits on the store.
- `train_info` (value 1) on every node: the labels, the run's name and the node.

Monitoring never stops training: a range with no free port, or an address this host does not
have, costs one warning and no exporter; the run trains on.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

from train.config import ConfigError, MonitorConfig
from train.distributed import World
from train.heartbeat import KEY, Beat, read_beats, rendezvous_store
from train.trackers import RunInfo

log = logging.getLogger(__name__)

# metrics.jsonl row key -> (series name, help). Units in the names, as Prometheus's conventions ask.
ROW_SERIES = {
    "step": ("train_step", "Last optimizer step logged"),
    "loss": ("train_loss", "Training loss, mean over the steps since the previous row"),
    "lr": ("train_learning_rate", "Learning rate"),
    "grad_norm": ("train_grad_norm", "Gradient norm of the row's last step"),
    "tokens_per_s": ("train_tokens_per_second", "Tokens per second over every rank since the previous row"),
    "mfu": ("train_mfu_ratio", "Model FLOPs utilisation (0-1); absent where the peak FLOP/s is unknown"),
    "tokens_seen": ("train_tokens_seen", "Tokens trained on since step 0"),
    "data_wait_s": ("train_data_wait_seconds", "Time per step the loop waited for batches"),
    "memory_bytes": ("train_memory_bytes", "Peak memory allocated in the window, maximum over the ranks"),
    "memory_reserved_bytes": ("train_memory_reserved_bytes", "Peak memory reserved by the CUDA allocator"),
    "skipped_shards": ("train_skipped_shards", "Corrupt shards skipped so far"),
    "skipped_steps": ("train_skipped_steps", "Non-finite steps skipped so far"),
    "time": ("train_row_time_seconds", "Unix time of the latest metrics row"),
}
CHECKPOINT_SERIES = {
    "step": ("train_checkpoint_step", "Step of the last committed checkpoint"),
    "save_s": ("train_checkpoint_save_seconds", "Last committed checkpoint: from the start of its save to its commit"),
    "blocked_s": ("train_checkpoint_blocked_seconds", "Last committed checkpoint: time the loop waited for it"),
    "time": ("train_checkpoint_time_seconds", "Unix time the last checkpoint was committed"),
}


def check(cfg: MonitorConfig) -> range:
    """The ports a node's exporter tries, first to last (empty when it is off). A range past the
    last port, or a missing prometheus-client, is a ConfigError: every rank calls this at start-up."""
    if cfg.prometheus_port == 0:
        return range(0)
    last = cfg.prometheus_port + cfg.prometheus_port_count - 1
    if last > 65535:
        raise ConfigError(f"monitor.prometheus_port={cfg.prometheus_port} with monitor.prometheus_port_count="
                          f"{cfg.prometheus_port_count} reaches port {last}, past 65535; lower either")
    try:
        import prometheus_client  # noqa: F401 - an optional extra, imported only when asked for
    except ImportError:
        raise ConfigError(f"monitor.prometheus_port={cfg.prometheus_port} needs the prometheus-client package: "
                          f"pip install -e '.[prometheus]' (or pip install prometheus-client), or set "
                          f"monitor.prometheus_port=0") from None
    return range(cfg.prometheus_port, last + 1)


def bind(ports: range, address: str, registry: Any) -> tuple[Any, int] | None:
    """prometheus-client's HTTP server on the first free port of `ports`: (server, port), or
    None after one warning when none is free or the address cannot be bound."""
    from prometheus_client import start_http_server

    for port in ports:
        try:
            server, _ = start_http_server(port, addr=address, registry=registry)
            return server, port
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            log.warning("Prometheus exporter not started: cannot bind %s:%d (%s); set monitor.prometheus_address "
                        "to an address of this host (0.0.0.0 = all). Training goes on without it",
                        address, port, exc.strerror or exc)
            return None
    log.warning("Prometheus exporter not started: every port of %d-%d on %s is taken; raise "
                "monitor.prometheus_port_count or choose another monitor.prometheus_port. Training goes on "
                "without it", ports[0], ports[-1], address)
    return None


class BeatWatch:
    """A poller thread that reads some ranks' beats and notes, on this node's clock, when each
    rank's counter last moved (see the module docstring)."""

    def __init__(self, store: Any, ranks: list[int], interval_s: float) -> None:
        self.store, self.ranks, self.interval_s = store, ranks, interval_s
        self.keys = [KEY.format(rank=r) for r in ranks]
        self.moved: dict[int, tuple[Beat, float]] = {}  # rank -> (its latest beat, when its counter last moved)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prometheus-beats", daemon=True)

    def start(self) -> BeatWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        if not self.store.check(self.keys):  # a rank that has not beaten yet: multi_get would wait
            return
        now = time.monotonic()
        for rank, beat in read_beats(self.store, self.ranks).items():
            seen = self.moved.get(rank)
            self.moved[rank] = (beat, now if seen is None or seen[0].count != beat.count else seen[1])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s / 2):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the store's host is gone: the ages grow, as they should
                log.debug("heartbeats not read: %s", exc)


class Collector:
    """Builds the series from what the exporter holds, at scrape time."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        e = self.exporter
        names, values = list(e.labels), list(e.labels.values())

        def family(name: str, help_text: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_text, labels=[*names, *extra])

        info = family("train_info", "The run's labels, name and this node", ("name", "node"))
        info.add_metric([*values, e.run_name, str(e.node)], 1)
        yield info
        row, val_row, checkpoint = e.row, e.val_row, e.checkpoint  # one consistent row each
        for key, (name, help_text) in ROW_SERIES.items():
            if row is not None and isinstance(row.get(key), (int, float)):
                gauge = family(name, help_text)
                gauge.add_metric(values, float(row[key]))
                yield gauge
        if row is not None:
            gauge = family("train_slow_ranks", "Ranks named stragglers now (train/stragglers.py)")
            gauge.add_metric(values, len(row.get("slow_ranks") or []))
            yield gauge
            sources = family("train_source_tokens", "Tokens trained on per data source", ("source",))
            for source, tokens in (row.get("source_tokens") or {}).items():
                sources.add_metric([*values, source], float(tokens))
            yield sources
        if val_row is not None:
            gauge = family("train_val_loss", "Held-out loss at the latest evaluation")
            gauge.add_metric(values, float(val_row["val_loss"]))
            yield gauge
        for key, (name, help_text) in CHECKPOINT_SERIES.items():  # a row of an older harness may lack some
            if checkpoint is not None and isinstance(checkpoint.get(key), (int, float)):
                gauge = family(name, help_text)
                gauge.add_metric(values, float(checkpoint[key]))
                yield gauge
        if checkpoint is not None and isinstance(checkpoint.get("time"), (int, float)):
            gauge = family("train_checkpoint_age_seconds", "Seconds since the last checkpoint was committed")
            gauge.add_metric(values, max(0.0, time.time() - checkpoint["time"]))
            yield gauge
        if e.beats is not None:
            yield from self._ranks(family, values, e.beats, e.local_world_size)

    @staticmethod
    def _ranks(family: Any, values: list[str], beats: BeatWatch, local_world_size: int) -> Any:
        now = time.monotonic()
        age = family("train_heartbeat_age_seconds", "Seconds since the rank's heartbeat counter last moved, "
                     "seen from this node", ("rank", "node"))
        own = family("train_rank_own_step_seconds", "The rank's own time per step (data wait, forward, update) "
                     "over its last metrics window", ("rank", "node"))
        reported = family("train_rank_reported_step", "Last step of the window in the rank's own time", ("rank", "node"))
        for rank, (beat, moved) in sorted(dict(beats.moved).items()):
            labels = [*values, str(rank), str(rank // local_world_size)]
            age.add_metric(labels, now - moved)
            if beat.own_step_s is not None:
                own.add_metric(labels, beat.own_step_s)
                reported.add_metric(labels, beat.through_step)
        yield from (age, own, reported)


class Exporter:
    """One node's `/metrics`; on rank 0 also a Tracker fed every metrics row and checkpoint."""

    def __init__(self, run: RunInfo, world: World) -> None:
        self.labels = {"run": run.run_id, **run.labels}
        self.run_name = run.name
        self.node = world.rank // world.local_world_size
        self.local_world_size = world.local_world_size
        self.row: dict[str, Any] | None = None
        self.val_row: dict[str, Any] | None = None
        self.checkpoint = last_checkpoint(run.run_dir) if world.rank == 0 else None
        self.beats: BeatWatch | None = None
        self.server: Any = None
        self.url = ""

    def log_row(self, row: dict[str, Any]) -> None:
        self.row = row
        if "val_loss" in row:
            self.val_row = row

    def log_checkpoint(self, row: dict[str, Any]) -> None:
        self.checkpoint = row

    def close(self) -> None:
        """Stop serving and free the port (a sweep's next job in this process binds it again)."""
        if self.beats is not None:
            self.beats.stop()
        if self.server is not None:
            server, self.server = self.server, None
            server.shutdown()
            server.server_close()


def last_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The last row of checkpoints.jsonl (a resumed run's checkpoint age goes on from it)."""
    path = run_dir / "checkpoints.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return None


def serve(cfg: MonitorConfig, world: World, run: RunInfo, *, heartbeat_interval_s: float) -> Exporter | None:
    """The process with local rank 0 starts its node's exporter and returns it; None elsewhere,
    when it is off, or when it could not bind (one warning)."""
    ports = check(cfg)
    if not ports or world.local_rank != 0:
        return None
    from prometheus_client import CollectorRegistry

    exporter = Exporter(run, world)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(exporter))
    bound = bind(ports, cfg.prometheus_address, registry)
    if bound is None:
        return None
    exporter.server, port = bound
    host = socket.gethostname() if cfg.prometheus_address in ("0.0.0.0", "::", "") else cfg.prometheus_address
    exporter.url = f"http://{host}:{port}/metrics"
    store = rendezvous_store() if world.world_size > 1 and heartbeat_interval_s > 0 else None
    if store is not None:
        first = exporter.node * world.local_world_size
        ranks = sorted({0, *range(first, first + world.local_world_size)})
        exporter.beats = BeatWatch(store, ranks, heartbeat_interval_s).start()
    log.setLevel(logging.INFO)  # one line per node: the other ranks' loggers show warnings only
    log.info("node %d serves Prometheus metrics at %s (run=%s)", exporter.node, exporter.url, exporter.labels["run"])
    return exporter
