"""Serve a bundle across K processes: embedding shards on every rank, the HTTP front on rank 0.

``codesign serve BUNDLE --devices K`` (or the same command under ``torchrun --nproc-per-node K``)
runs K ranks on one torch.distributed process group (gloo: CPU tensors). Rank 0 is the server the
clients see: HTTP, routing, request-aware batching, and the dense part of every batch. Every rank,
rank 0 included, holds only its own shards of the planned tables, read from the bundle's
``tables.bin`` block by block (``codesign.build.shard_blocks``); no rank ever holds a whole sharded
table. For each batch rank 0 computes the lookups' ids, sends a command, and all ranks run one
exchange (``ShardedProgram.exchange``): ids to their owners, pooled rows back.

How a lost rank is noticed, and what happens then:

- every other rank adds to a heartbeat counter in the group's key-value store every
  ``heartbeat_s``; rank 0 watches the counters and, for ranks it started, their exit codes;
- a rank that exits, or whose counter stands still for ``rank_timeout_s``, is *lost*: the server
  turns unready at once, requests get 503 naming the rank, and no collective waits longer than
  ``rank_timeout_s`` (the process group's timeout; ranks rank 0 started are also killed, which ends
  a collective waiting on them at once);
- ``on_rank_failure="exit"``: rank 0 answers what it holds and exits non-zero (3); under torchrun,
  torchrun's ``--max-restarts`` then restarts the group. ``"restart"``: rank 0 stops the other ranks,
  starts a new group (up to ``max_restarts`` times) and turns ready again once every rank has loaded.

Rank 0 sends a no-op command when idle, so the other ranks' wait for the next command never
reaches the process group's timeout; a rank whose rank 0 is gone exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from codesign.errors import ConfigError, RankLostError, ShardingError
from codesign.sharding import runtime as shard_runtime
from codesign.sharding.runtime import ShardedProgram

if TYPE_CHECKING:
    from codesign.build.variant import Variant
    from codesign.build.weights import WeightsDelta
    from codesign.serving.deployment import Bundle

__all__ = ["RankGroup", "ShardedServing", "rank_main", "torchrun_env"]

log = logging.getLogger(__name__)

_TICK, _LOOKUP, _STOP, _UPDATE, _RELEASE = 0, 1, 2, 3, 4
EXIT_RANK_LOST = 3  # the exit code of a server that lost a rank and was told to exit
_STARTUP_TIMEOUT_S = 300.0  # ranks importing torch and reading their shards on a loaded host


@dataclasses.dataclass(frozen=True)
class ShardedServing:
    """How a sharded server runs its ranks (``codesign serve --devices K``)."""

    devices: int
    rank_timeout_s: float = 10.0
    on_rank_failure: Literal["exit", "restart"] = "exit"
    max_restarts: int = 3
    heartbeat_s: float = 0.25
    threads: int | None = None  # torch intra-op threads per rank (default: torch's)
    backend: str = "gloo"

    def __post_init__(self) -> None:
        if self.devices < 2:
            raise ConfigError(
                f"a sharded server needs 2 or more devices, got {self.devices}",
                fix="serve a one-device bundle without --devices",
            )
        if self.on_rank_failure not in ("exit", "restart"):
            raise ConfigError(f"on_rank_failure must be 'exit' or 'restart', not {self.on_rank_failure!r}")
        if not self.rank_timeout_s > 4 * self.heartbeat_s:
            raise ConfigError(
                f"rank_timeout_s ({self.rank_timeout_s}) must exceed 4 heartbeats ({4 * self.heartbeat_s} s)"
            )
        if self.backend != "gloo":
            raise ConfigError(
                f"sharded serving exchanges CPU tensors over gloo; backend {self.backend!r} is not supported",
                fix="use the default backend (gloo)",
            )

    @property
    def tick_s(self) -> float:
        """How often an idle rank 0 sends a no-op command (well inside the process group's timeout)."""
        return max(0.2, min(2.0, self.rank_timeout_s / 4))


@dataclasses.dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells each process (RANK, WORLD_SIZE, MASTER_ADDR/PORT, its agent's store)."""

    rank: int
    world: int
    host: str
    port: int
    agent_store: bool
    attempt: int


def torchrun_env(environ: Mapping[str, str] = os.environ) -> TorchrunEnv | None:
    """The torchrun environment of this process, or None when not launched by torchrun."""
    if "TORCHELASTIC_RUN_ID" not in environ and "LOCAL_RANK" not in environ:
        return None
    try:
        return TorchrunEnv(
            int(environ["RANK"]),
            int(environ["WORLD_SIZE"]),
            environ.get("MASTER_ADDR", "127.0.0.1"),
            int(environ["MASTER_PORT"]),
            environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
            int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"torchrun environment is incomplete: {exc}", fix="launch with torchrun") from exc


# ---- loading a rank's part of a bundle -----------------------------------------------------------


def sharded_names(variants: Mapping[str, Variant], devices: int) -> list[str]:
    """The variants that run across the group (those with a plan), in the order every rank numbers them.

    Every planned variant must be planned for ``devices`` devices and use the eager backend (the
    ranks run the FX graph's two halves around the exchange)."""
    names = sorted(n for n, v in variants.items() if v.plan is not None)
    if not names:
        raise ShardingError(
            "no variant of this bundle is planned across devices, so there is nothing to shard",
            fix="compile with --devices K (a multi-device target), or serve without --devices",
        )
    for name in names:
        variant = variants[name]
        assert variant.plan is not None
        if variant.plan.topology.size != devices:
            raise ShardingError(
                f"variant '{name}' is planned for {variant.plan.topology.size} devices, not {devices}",
                fix=f"serve with --devices {variant.plan.topology.size}, or compile with --devices {devices}",
            )
        if variant.backend.name != "eager":
            raise ShardingError(
                f"variant '{name}' was compiled for backend '{variant.backend.name}'; sharded serving runs "
                "the eager program's halves around the embedding exchange",
                fix="compile the multi-device bundle with --backend eager",
            )
        if variant.sharded_tables is None:
            raise ShardingError(
                f"variant '{name}' stores its planned tables inside its program (a bundle written before "
                "tables.bin existed), so a rank cannot read its shards alone",
                fix="recompile the bundle with this codesign",
            )
    return names


def _programs(variants: Mapping[str, Variant], names: list[str]) -> list[ShardedProgram]:
    """This rank's ShardedProgram of each planned variant, its shards read from tables.bin alone."""
    from codesign.build.shard_blocks import read_block

    out = []
    for name in names:
        variant = variants[name]
        assert variant.plan is not None and variant.sharded_tables is not None
        path, record = variant.sharded_tables
        out.append(
            ShardedProgram(
                variant.exported.module(), variant.plan, blocks=functools.partial(read_block, path, record)
            )
        )
    return out


def _load_bundle(directory: Path, trust: Mapping[str, Any]) -> Bundle:
    """Rank 0's bundle: every variant (those without a plan it scores alone), planned tables left out."""
    from codesign.serving.deployment import load_bundle

    return load_bundle(
        directory,
        strict=True,
        trusted_keys=trust.get("trusted_keys", ()),
        allow_unsigned_native=bool(trust.get("allow_unsigned_native", False)),
        planned_tables="leave",
    )


def _planned_variants(directory: Path, trust: Mapping[str, Any]) -> dict[str, Variant]:
    """A rank's variants: only those planned across devices (a one-device fallback variant of a
    multi-variant bundle is rank 0's alone, and is not loaded here)."""
    from codesign.build.bundle import load, read_manifest
    from codesign.build.bundle_write import MANIFEST, MULTI_FORMAT, PLAN, SAFE_NAME
    from codesign.serving.deployment import VARIANTS_DIR

    keys = {
        "trusted_keys": trust.get("trusted_keys", ()),
        "allow_unsigned_native": bool(trust.get("allow_unsigned_native", False)),
        "planned_tables": "leave",
    }
    try:
        top = json.loads((directory / MANIFEST).read_bytes())
    except (OSError, ValueError) as exc:
        raise ShardingError(f"cannot read {directory / MANIFEST}: {exc}") from exc
    if not isinstance(top, dict) or top.get("format") != MULTI_FORMAT:
        variant = load(directory, **keys)  # type: ignore[arg-type]
        return {variant.name: variant} if variant.plan is not None else {}
    out = {}
    for entry in top.get("variants", []):
        name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
        if not SAFE_NAME.match(name) or entry.get("dir") != f"{VARIANTS_DIR}/{name}":
            raise ShardingError(f"{directory / MANIFEST} lists an unsafe variant entry {name!r}")
        sub = directory / VARIANTS_DIR / name
        if PLAN in read_manifest(sub)["files"]:
            out[name] = load(sub, manifest_sha256=entry.get("manifest_sha256"), **keys)  # type: ignore[arg-type]
    return out


def manifest_digest(directory: Path) -> str:
    """sha256 of a bundle's top manifest: what every rank must have read (one bundle, not two)."""
    from codesign.build.bundle_write import MANIFEST

    try:
        return hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
    except OSError as exc:
        raise ShardingError(f"cannot read {directory / MANIFEST}: {exc.strerror or exc}") from exc


# ---- the other ranks ------------------------------------------------------------------------------


StoreAddress = tuple[str, ...]  # ("file", path): ranks rank 0 started; ("tcp", host, port): torchrun's


def _connect(address: StoreAddress, world: int) -> dist.Store:
    """A connection to the group's key-value store (heartbeats, errors, start-up and update records)."""
    startup = datetime.timedelta(seconds=_STARTUP_TIMEOUT_S)
    if address[0] == "file":  # a file in a folder only this user can open: nothing listens on a port
        store: dist.Store = dist.FileStore(address[1], -1)
        store.set_timeout(startup)
        return store
    return dist.TCPStore(address[1], int(address[2]), world, is_master=False, timeout=startup)


def _heartbeat(
    store: dist.Store, rank: int, every_s: float, parent: int | None, stop: threading.Event
) -> None:
    while not stop.wait(every_s):
        if parent is not None and os.getppid() != parent:  # rank 0 is gone: nothing to serve
            os._exit(1)
        try:
            store.add(f"hb/{rank}", 1)
        except Exception:  # the store lives in rank 0 (or torchrun's agent): gone with it
            os._exit(1)


def rank_main(
    rank: int,
    world: int,
    address: StoreAddress,
    prefix: str,
    bundle_dir: str,
    trust: Mapping[str, Any],
    config: ShardedServing,
    parent: int | None = None,
) -> int:
    """Run rank ``rank`` (> 0) of a sharded server until rank 0 stops it; its exit code.

    Joins the group, checks it reads the bundle rank 0 reads, loads its shards and builds the weights
    versions in use (a restarted group), says it is ready, waits for every rank to be, then takes
    part in every exchange rank 0 starts. Start-up runs under a long timeout (ranks load at their
    own pace); the serving loop under ``rank_timeout_s``. Why it failed, if it did, goes to the
    store for rank 0 to report."""
    if config.threads:
        torch.set_num_threads(config.threads)
    startup = datetime.timedelta(seconds=_STARTUP_TIMEOUT_S)
    store = dist.PrefixStore(prefix, _connect(address, world))
    store.set(f"joined/{rank}", str(os.getpid()))
    beat = dist.PrefixStore(prefix, _connect(address, world))  # its own connection, for its own thread
    stop = threading.Event()
    threading.Thread(
        target=_heartbeat, args=(beat, rank, config.heartbeat_s, parent, stop), daemon=True
    ).start()
    try:
        dist.init_process_group(
            config.backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world, timeout=startup
        )
        want, got = store.get("bundle_sha256").decode(), manifest_digest(Path(bundle_dir))
        if want != got:
            raise ShardingError(
                f"rank {rank} reads another bundle at {bundle_dir} than rank 0 (manifest sha256 {got[:12]}..., "
                f"rank 0's {want[:12]}...): the bundle was replaced while the server runs",
                fix="restart the whole server on the new bundle",
            )
        variants = _planned_variants(Path(bundle_dir), trust)
        names = sharded_names(variants, world)
        versions = {0: _programs(variants, names)}  # weights version -> this rank's programs
        replay = json.loads(store.get("replay").decode())  # the versions in use, built again in order
        for version, base, path, sha256 in replay["build"]:
            rows, _, _ = _table_rows(variants, names, path, sha256)
            versions[version] = [p.updated(rows) for p in versions[base]]
        for version in replay["drop"]:
            versions.pop(version, None)
        info = {"pid": os.getpid(), "shard_bytes": sum(p.shard_bytes for p in versions[0])}
        store.set(f"ready/{rank}", json.dumps(info))
        store.wait(["go"], startup)
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=config.rank_timeout_s))
        command = torch.zeros(3, dtype=torch.int64)
        while True:
            dist.broadcast(command, src=0)
            op, a, b = (int(x) for x in command.tolist())
            if op == _STOP:
                return 0
            if op == _LOOKUP:
                versions[b][a].serve_peers()
            elif op == _UPDATE:  # built beside the serving loop: lookups on older versions go on
                threading.Thread(
                    target=_apply_update,
                    args=(store, rank, versions, a, b, variants, names),
                    name=f"codesign-update-{a}",
                    daemon=True,
                ).start()
            elif op == _RELEASE:
                versions.pop(a, None)
    except Exception as exc:
        with contextlib.suppress(Exception):
            store.set(f"error/{rank}", f"{type(exc).__name__}: {exc}"[:2000])
        log.error("rank %d stops: %s: %s", rank, type(exc).__name__, exc)
        return 1
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _table_rows(
    variants: Mapping[str, Variant], names: list[str], path: str, sha256: str
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any], WeightsDelta]:
    """The sharded tables' (row ids, new rows) of a delta file, checked against every planned
    variant; the rest of the delta per variant (dense weights: rank 0's part); the delta itself."""
    from codesign.build.weights import WeightsDelta, split_delta

    delta = WeightsDelta.read(path, sha256)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rest: dict[str, Any] = {}
    for name in names:
        variant = variants[name]
        assert variant.plan is not None
        rest[name], table_rows = split_delta(variant, delta, {t.name for t in variant.plan.tables})
        rows.update(table_rows)
    return rows, rest, delta


def _apply_update(
    store: dist.Store,
    rank: int,
    versions: dict[int, list[ShardedProgram]],
    version: int,
    base: int,
    variants: Mapping[str, Variant],
    names: list[str],
) -> None:
    """Build weights version ``version`` of this rank's shards from ``base`` and a delta file."""
    try:
        record = json.loads(store.get(f"update/{version}").decode())
        rows, _, _ = _table_rows(variants, names, record["path"], record["sha256"])
        versions[version] = [p.updated(rows) for p in versions[base]]
        store.set(f"updated/{version}/{rank}", "ok")
    except Exception as exc:
        log.error("rank %d cannot build weights version %d: %s: %s", rank, version, type(exc).__name__, exc)
        store.set(f"updated/{version}/{rank}", f"{type(exc).__name__}: {str(exc)[:500]}")


def _spawned_rank(*args: Any) -> None:
    """Entry point of a rank rank 0 started itself (a spawned process)."""
    logging.basicConfig(level=logging.WARNING, format=f"rank {args[0]}: %(levelname)s %(message)s")
    os._exit(rank_main(*args))


# ---- rank 0 ---------------------------------------------------------------------------------------


class RankGroup:
    """Rank 0's side of a sharded server: starts (or joins) the group, runs every collective, watches
    the other ranks, and reports whether the group is whole (``problem``, ``describe``).

    >>> group = RankGroup(Path("bundle"), ShardedServing(devices=4)); bundle = group.start()
    >>> runtime = Runtime(bundle, group=group)
    """

    def __init__(
        self,
        bundle_dir: Path,
        config: ShardedServing,
        *,
        trust: Mapping[str, Any] | None = None,
        torchrun: TorchrunEnv | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.config = config
        self.trust = dict(trust or {})
        self.torchrun = torchrun
        self.world = torchrun.world if torchrun else config.devices
        if torchrun is not None and torchrun.world != config.devices:
            raise ConfigError(
                f"--devices {config.devices} but torchrun started {torchrun.world} processes",
                fix="give --devices the same count as --nproc-per-node (or leave it out under torchrun)",
            )
        if torchrun is not None and config.on_rank_failure == "restart":
            raise ConfigError(
                "under torchrun the group is restarted by torchrun (--max-restarts), not by rank 0",
                fix="use --on-rank-failure exit under torchrun",
            )
        self.on_exit = on_exit  # called once when a lost rank should end the server
        self.generation = 0
        self.restarts = 0
        self.exit_code = 0
        self._lock = threading.Lock()  # one collective sequence at a time
        self._state = threading.Lock()
        self._problem: str | None = None
        self._lost_rank: int | None = None
        self._procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self._info: dict[int, dict[str, Any]] = {}
        self._beats: dict[int, tuple[int, float]] = {}
        self._programs: dict[int, list[ShardedProgram]] = {}  # weights version -> rank 0's programs
        self._updates: dict[int, tuple[int, str, str]] = {}  # version -> (base, delta path, sha256)
        self._to_release: list[int] = []
        self._versions = iter(range(1, 1 << 62))
        self._bundle: Bundle | None = None
        self._names: list[str] = []
        self._last_call = time.monotonic()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.call_seconds = 0.0
        self._master: dist.Store | None = None
        self._address: StoreAddress = ()
        self._folder: Path | None = None  # the file store's private folder (ranks rank 0 started)
        self._digest = ""

    # ---- start ----------------------------------------------------------------------------------
    def start(self) -> Bundle:
        """Start (or join) the group, load rank 0's part of the bundle, wait until every rank has
        loaded its shards; the bundle, its planned variants scoring through the group."""
        self._digest = manifest_digest(self.bundle_dir)
        if self.torchrun is not None:
            env = self.torchrun
            self._address = ("tcp", env.host, str(env.port))
            self._master = dist.TCPStore(
                env.host,
                env.port,
                env.world,
                is_master=not env.agent_store,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=_STARTUP_TIMEOUT_S),
            )
            self.generation = env.attempt
        else:
            self._folder = Path(tempfile.mkdtemp(prefix="codesign-group-"))  # mode 0700
            self._address = ("file", str(self._folder / "store"))
            self._master = _connect(self._address, self.world)
        self._publish()
        self._spawn()
        bundle = _load_bundle(self.bundle_dir, self.trust)  # while the other ranks import torch
        self._names = sharded_names(bundle.variants, self.world)
        self._join()
        self._programs = {0: _programs(bundle.variants, self._names)}
        self._bundle = bundle
        self._await_ready()
        self._go()
        for index, name in enumerate(self._names):
            bundle.variants[name].runner = functools.partial(self.run, index, 0)
        self._threads = [
            threading.Thread(target=self._watch, name="codesign-ranks", daemon=True),
            threading.Thread(target=self._tick, name="codesign-tick", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return bundle

    @property
    def _prefix(self) -> str:
        return f"codesign/{self.generation}/"

    def _store(self) -> dist.Store:
        assert self._master is not None
        return dist.PrefixStore(self._prefix, self._master)

    def _publish(self) -> None:
        """What the ranks of this generation read at start: rank 0's bundle digest and the weights
        versions to build (none at first; after a restart, those in use and the versions they grew from)."""
        live = {v for v in self._programs if v != 0}
        needed: set[int] = set()
        for version in live:
            while version != 0 and version not in needed:
                needed.add(version)
                version = self._updates[version][0]
        replay = {
            "build": [[v, *self._updates[v]] for v in sorted(needed)],
            "drop": sorted(needed - live),
        }
        store = self._store()
        store.set("bundle_sha256", self._digest)
        store.set("replay", json.dumps(replay))

    def _spawn(self) -> None:
        if self.torchrun is not None:
            return
        ctx = multiprocessing.get_context("spawn")
        for rank in range(1, self.world):
            args = (
                rank,
                self.world,
                self._address,
                self._prefix,
                str(self.bundle_dir),
                self.trust,
                self.config,
                os.getpid(),
            )
            proc = ctx.Process(target=_spawned_rank, args=args, name=f"codesign-rank-{rank}", daemon=True)
            proc.start()
            self._procs[rank] = proc

    def _wait_for(self, key: str, what: str) -> dict[int, str]:
        """Each other rank's value of ``key``, waiting while ranks rank 0 started are alive."""
        store, deadline = self._store(), time.monotonic() + _STARTUP_TIMEOUT_S
        got: dict[int, str] = {}
        while len(got) < self.world - 1:
            for rank in range(1, self.world):
                if rank in got:
                    continue
                if store.check([f"error/{rank}"]):
                    raise ShardingError(
                        f"rank {rank} failed to {what}: {store.get(f'error/{rank}').decode()}"
                    )
                proc = self._procs.get(rank)
                if proc is not None and proc.exitcode is not None:
                    raise ShardingError(
                        f"rank {rank} exited with code {proc.exitcode} before it could {what}"
                    )
                if store.check([f"{key}/{rank}"]):
                    got[rank] = store.get(f"{key}/{rank}").decode()
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, self.world)) - got.keys())
                raise ShardingError(f"ranks {missing} did not {what} within {_STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        return got

    def _join(self) -> None:
        self._wait_for("joined", "join the group")
        try:
            dist.init_process_group(
                self.config.backend,
                store=dist.PrefixStore("pg", self._store()),
                rank=0,
                world_size=self.world,
                timeout=datetime.timedelta(seconds=_STARTUP_TIMEOUT_S),  # ranks load at their own pace
            )
        except Exception as exc:
            store = self._store()
            why = [
                f"rank {r}: {store.get(f'error/{r}').decode()}"
                for r in range(1, self.world)
                if store.check([f"error/{r}"])
            ]
            raise ShardingError(
                f"the ranks could not form a process group: {'; '.join(why) or f'{type(exc).__name__}: {exc}'}"
            ) from exc

    def _go(self) -> None:
        """Every rank is ready: from now on a collective waits at most ``rank_timeout_s``."""
        self._store().set("go", "1")
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=self.config.rank_timeout_s))
        self._last_call = 0.0  # a no-op goes out at the next tick

    def _await_ready(self) -> None:
        ready = self._wait_for("ready", "load its shards")
        self._info = {r: json.loads(v) for r, v in ready.items()}
        self._info[0] = {"pid": os.getpid(), "shard_bytes": sum(p.shard_bytes for p in self._programs[0])}
        now = time.monotonic()
        self._beats = {r: (-1, now) for r in range(1, self.world)}

    # ---- scoring --------------------------------------------------------------------------------
    def run(self, index: int, version: int, **inputs: Any) -> Any:
        """Score one call of planned variant ``index`` on weights ``version`` across the group (the
        variant's runner)."""
        problem = self.problem()
        if problem is not None:
            raise RankLostError(problem, fix="retry later; GET /v2/health/ready says when the group is whole")
        program = self._programs[version][index]
        t0 = time.perf_counter()
        flat, ids, lengths = program.route(**inputs)  # this rank's own work: errors are the request's
        with self._lock:
            if self._problem is not None:
                raise RankLostError(self._problem)
            pooled = self._exchange(program, index, version, ids, lengths)
        out = program.finish(flat, pooled)
        self.call_seconds += time.perf_counter() - t0
        return out

    def _exchange(
        self,
        program: ShardedProgram,
        index: int,
        version: int,
        ids: Mapping[str, torch.Tensor],
        lengths: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The lookup command and the exchange (the caller holds the group's lock)."""
        try:
            self._flush_releases()
            self._send(_LOOKUP, index, version)
            return program.exchange(ids, lengths)
        except Exception as exc:
            raise self._collective_failed(exc) from exc
        finally:
            self._last_call = time.monotonic()

    def _check_reference(self) -> None:
        """Every planned variant scores its reference batch through the group (lock held): a group
        started again must reproduce the bundle's scores before it serves."""
        assert self._bundle is not None
        for index, name in enumerate(self._names):
            program = self._programs[0][index]

            def runner(_p: ShardedProgram = program, _i: int = index, **inputs: Any) -> Any:
                flat, ids, lengths = _p.route(**inputs)
                return _p.finish(flat, self._exchange(_p, _i, 0, ids, lengths))

            variant = dataclasses.replace(self._bundle.variants[name], runner=runner)
            ok, max_abs = variant.check_reference()
            if not ok:
                raise ShardingError(
                    f"variant '{name}' scores its reference batch with max abs error {max_abs:.3g} on the "
                    "restarted group"
                )

    @staticmethod
    def _send(op: int, a: int = 0, b: int = 0) -> None:
        """One command to every rank (the caller holds the group's lock)."""
        dist.broadcast(torch.tensor([op, a, b], dtype=torch.int64), src=0)

    def _flush_releases(self) -> None:
        """Tell every rank to drop the versions released since the last command (lock held)."""
        while self._to_release:
            version = self._to_release.pop()
            self._send(_RELEASE, version)
            self._programs.pop(version, None)

    @property
    def planned(self) -> list[str]:
        """The variants that score across the group, in the order the ranks number them."""
        return list(self._names)

    def update(self, base: int, path: Path, sha256: str) -> tuple[int, dict[str, Any], WeightsDelta]:
        """Build weights version N of every rank's shards from version ``base`` and a delta file; every
        rank checks the file's sha256 and builds beside the serving loop. Returns (N, the rest of the
        delta per planned variant, for rank 0's dense weights, and the delta as read). Nothing is kept unless every rank built it.

        The file must be readable at the same path on every rank (one host, or a shared folder)."""
        from codesign.errors import WeightsError

        if self._problem is not None:
            raise RankLostError(self._problem)
        assert self._bundle is not None
        path = Path(path).resolve()
        # a bad delta is refused here, before any rank works
        rows, rest, delta = _table_rows(self._bundle.variants, self._names, str(path), sha256)
        own = [p.updated(rows) for p in self._programs[base]]
        version = next(self._versions)
        with self._lock:  # the record and the command in one generation: a restart cannot come between
            if self._problem is not None:
                raise RankLostError(self._problem)
            self._store().set(f"update/{version}", json.dumps({"path": str(path), "sha256": sha256}))
            self._send(_UPDATE, version, base)
            self._last_call = time.monotonic()
        try:
            results = self._wait_for(f"updated/{version}", "build the new weights")
        except Exception:
            self.release(version)  # ranks that built it drop it at the next command
            raise
        failed = {r: v for r, v in results.items() if v != "ok"}
        if failed:
            self.release(version)
            raise WeightsError(
                "ranks could not build the new weights: "
                + "; ".join(f"rank {r}: {v}" for r, v in sorted(failed.items())),
                fix="nothing was changed; the delta file must be readable at the same path by every rank",
            )
        self._programs[version] = own
        self._updates[version] = (base, str(path), sha256)
        return version, rest, delta

    def attach(self, variant: Any, index: int, version: int, graph_module: Any = None) -> None:
        """Make ``variant`` (a new weights version of planned variant ``index``) score on shards
        ``version``; ``graph_module``: its program with new dense weights, for rank 0's halves."""
        if graph_module is not None:
            self._programs[version][index] = self._programs[version][index].updated({}, graph_module)
        variant.runner = functools.partial(self.run, index, version)

    def release(self, version: int) -> None:
        """Weights ``version`` is no longer served by anything: every rank drops it (at the next idle
        moment; callable from any thread, a finalizer included)."""
        if version != 0:
            self._to_release.append(version)

    def _tick(self) -> None:
        """An idle rank 0 sends a no-op, so the others' wait for a command stays within the timeout."""
        while not self._stop.wait(self.config.tick_s / 2):
            if self._problem is not None or time.monotonic() - self._last_call < self.config.tick_s:
                continue
            with self._lock:
                if self._problem is not None or self._stop.is_set():
                    continue
                try:
                    self._flush_releases()
                    self._send(_TICK)
                except Exception as exc:
                    self._collective_failed(exc)
                self._last_call = time.monotonic()

    def _collective_failed(self, exc: Exception) -> RankLostError:
        """A collective raised: name the lost rank once the watcher knows it (it checks exit codes and
        heartbeats every ``heartbeat_s``), else say that the group failed."""
        deadline = time.monotonic() + 4 * self.config.heartbeat_s + 0.5
        while self._problem is None and time.monotonic() < deadline:
            time.sleep(self.config.heartbeat_s / 2)
        if self._problem is None:
            self._lose(
                None, f"a collective of the process group failed ({type(exc).__name__}: {str(exc)[:300]})"
            )
        return RankLostError(self._problem or "the process group failed")

    # ---- watching -------------------------------------------------------------------------------
    def problem(self) -> str | None:
        """Why the group cannot score now (a rank lost, a restart under way), or None."""
        return self._problem

    def _watch(self) -> None:
        beats = dist.PrefixStore(self._prefix, _connect(self._address, self.world))
        generation = self.generation
        while not self._stop.wait(self.config.heartbeat_s):
            if self._problem is not None:
                continue
            if generation != self.generation:  # a restarted group: its own keys
                beats = dist.PrefixStore(self._prefix, _connect(self._address, self.world))
                generation = self.generation
            now = time.monotonic()
            for rank in range(1, self.world):
                proc = self._procs.get(rank)
                if proc is not None and proc.exitcode is not None:
                    why = ""
                    with contextlib.suppress(Exception):
                        if beats.check([f"error/{rank}"]):
                            why = f": {beats.get(f'error/{rank}').decode()}"
                    self._lose(rank, f"rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}{why}")
                    break
                try:
                    count = beats.add(f"hb/{rank}", 0)
                except Exception as exc:
                    self._lose(None, f"the group's store failed ({type(exc).__name__}: {exc})")
                    break
                last, seen = self._beats.get(rank, (-1, now))
                if count != last:
                    self._beats[rank] = (count, now)
                elif now - seen > self.config.rank_timeout_s:
                    self._lose(
                        rank, f"rank {rank} sent no heartbeat for {now - seen:.1f} s (hung or unreachable)"
                    )
                    break

    def _lose(self, rank: int | None, why: str) -> None:
        with self._state:
            if self._problem is not None or self._stop.is_set():  # ranks that stopped on STOP are not lost
                return
            self._problem = f"the sharded group lost a rank: {why}"
            self._lost_rank = rank
        log.error("%s; the server is not ready", self._problem)
        for proc in self._procs.values():  # a collective waiting on a stopped or hung rank ends now
            if proc.is_alive():
                proc.kill()
        if self.config.on_rank_failure == "restart" and self.restarts < self.config.max_restarts:
            threading.Thread(target=self._restart, name="codesign-restart", daemon=True).start()
        else:
            self.exit_code = EXIT_RANK_LOST
            if self.on_exit is not None:
                threading.Thread(target=self.on_exit, name="codesign-exit", daemon=True).start()

    def _restart(self) -> None:
        lost = self._problem
        with self._lock:  # the collective in flight (if any) fails at once: its peers are killed
            for proc in self._procs.values():
                proc.join(timeout=10)
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self.restarts += 1
            self.generation += 1
            self._procs = {}
            with self._state:
                self._problem = (
                    f"{lost}; restarting the group (restart {self.restarts} of {self.config.max_restarts})"
                )
            try:
                self._publish()  # the new ranks build the versions in use before they say they are ready
                self._spawn()
                self._join()
                self._await_ready()
                self._go()
                self._check_reference()
            except Exception as exc:
                log.error("restarting the sharded group failed: %s", exc)
                with self._state:
                    self._problem = f"{lost}; restarting the group failed: {exc}"
                self.exit_code = EXIT_RANK_LOST
                if self.on_exit is not None:
                    threading.Thread(target=self.on_exit, name="codesign-exit", daemon=True).start()
                return
            self._last_call = time.monotonic()
            with self._state:
                self._problem, self._lost_rank = None, None
        log.warning("the sharded group is whole again (generation %d)", self.generation)

    def describe(self) -> dict[str, Any]:
        """Each rank's pid, shard bytes and state, for /healthz and /v2/health."""
        ranks = {}
        for rank in range(self.world):
            info = self._info.get(rank, {})
            state = "up"
            if self._problem is not None and rank != 0:  # rank 0 answers this: it is up
                state = "lost" if self._lost_rank in (None, rank) else "waiting"
            ranks[str(rank)] = {
                "pid": info.get("pid"),
                "shard_bytes": info.get("shard_bytes"),
                "state": state,
            }
        return {
            "world": self.world,
            "generation": self.generation,
            "restarts": self.restarts,
            "problem": self._problem,
            "ranks": ranks,
            "weights_versions": sorted(self._programs),  # the ranks' shard versions held
        }

    def comm_seconds(self) -> float:
        """Wall time rank 0 spent in all-to-alls (the rest of ``call_seconds`` is its own compute)."""
        return shard_runtime.COMM_SECONDS[0]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the other ranks (a stop command, then kill what is left) and leave the group."""
        self._stop.set()
        if not dist.is_initialized():
            timeout_s = 0.0  # nothing to tell them: the group never formed
        elif self._problem is None:
            with self._lock, contextlib.suppress(Exception):
                self._send(_STOP)
        deadline = time.monotonic() + timeout_s
        for proc in self._procs.values():
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
