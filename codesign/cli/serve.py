"""``codesign serve``: serve a bundle over HTTP (/v1/score, the Open Inference Protocol /v2, health, metrics)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from codesign.cli.flags import command_parser, non_negative_float, port, positive_float, positive_int
from codesign.cli.output import out
from codesign.cli.policy import add_policy_flags, bundle_renderables, policy_from_args
from codesign.cli.sign import add_trust_flags
from codesign.errors import ConfigError

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers

NAME = "serve"
HELP = "serve a bundle over HTTP: /v1/score, /v2 (KServe / Triton clients), /healthz, /metrics"


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP)
    if arguments:
        p.add_argument("bundle", type=Path, help="a bundle directory (single- or multi-variant)")
        p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
        p.add_argument("--port", type=port, default=8000, help="TCP port, 1..65535, or 0 for any free one")
        p.add_argument(
            "--max-batch-requests", type=positive_int, default=16, help="requests per batch at most"
        )
        p.add_argument(
            "--max-batch-candidates",
            type=positive_int,
            default=8192,
            help="candidates per batch at most (larger requests are scored in slices of this size)",
        )
        p.add_argument(
            "--max-delay-ms",
            type=non_negative_float,
            default=1.0,
            help="how long a batch waits for more requests",
        )
        p.add_argument(
            "--max-queued-requests",
            type=positive_int,
            default=512,
            help="requests waiting per variant before new ones get 429 + Retry-After",
        )
        p.add_argument(
            "--max-connections", type=positive_int, default=1024, help="connections beyond this get 503"
        )
        p.add_argument(
            "--drain-timeout",
            type=positive_float,
            default=30.0,
            help="seconds SIGTERM/SIGINT wait for admitted requests to be answered",
        )
        p.add_argument(
            "--auth-token-file",
            type=Path,
            help="file of bearer tokens, one per line: every endpoint but health probes needs one",
        )
        p.add_argument(
            "--admin-token-file",
            type=Path,
            help="file of admin bearer tokens, one per line: they turn on live weight updates "
            "(GET/POST /v2/admin/weights, POST /v2/admin/weights/rollback); off without it",
        )
        p.add_argument(
            "--rate-limit",
            type=non_negative_float,
            default=0.0,
            help="requests per second per client (0: off)",
        )
        p.add_argument("--rate-burst", type=positive_int, help="burst per client (default: twice the rate)")
        p.add_argument("--model-name", default="codesign", help="the model's name on /v2/models/NAME")
        p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's)")
        p.add_argument(
            "--devices",
            type=positive_int,
            help="serve a bundle compiled with --devices K on K ranks (gloo): each loads only its own "
            "embedding shards, rank 0 answers HTTP; under torchrun the ranks are torchrun's",
        )
        p.add_argument(
            "--rank-timeout",
            type=positive_float,
            default=10.0,
            help="seconds without a heartbeat (or in one collective) before a rank counts as lost",
        )
        p.add_argument(
            "--on-rank-failure",
            choices=("exit", "restart"),
            default="exit",
            help="when a rank is lost: exit with code 3 (a supervisor or torchrun restarts), or restart "
            "the ranks here (at most --max-restarts times)",
        )
        p.add_argument("--max-restarts", type=positive_int, default=3, help="group restarts before exiting")
        add_trust_flags(p)
        add_policy_flags(p, None)
    p.set_defaults(handler=run)


def read_tokens(path: Path, flag: str = "--auth-token-file") -> tuple[str, ...]:
    """Bearer tokens from a file: one per line, blank lines and '#' comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc}") from exc
    tokens = tuple(t.strip() for t in lines if t.strip() and not t.strip().startswith("#"))
    if not tokens:
        raise ConfigError(f"{flag} {path} holds no token", fix="one token per line")
    return tokens


def run(args: argparse.Namespace) -> int:
    import torch

    from codesign.serving.deployment import load_bundle
    from codesign.serving.http import Server, ServerConfig
    from codesign.serving.runtime import BatchingConfig, Runtime
    from codesign.serving.sharded import RankGroup, ShardedServing, rank_main, torchrun_env

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_connections=args.max_connections,
        drain_timeout_s=args.drain_timeout,
        auth_tokens=read_tokens(args.auth_token_file) if args.auth_token_file else (),
        admin_tokens=read_tokens(args.admin_token_file, "--admin-token-file")
        if args.admin_token_file
        else (),
        trusted_keys=tuple(str(k) for k in args.trusted_key or ()),
        allow_unsigned_native=args.allow_unsigned_native,
        rate_limit_rps=args.rate_limit,
        rate_limit_burst=args.rate_burst or 0,
        model_name=args.model_name,
    )
    group = None
    env = torchrun_env()
    if args.devices not in (None, 1) or (env is not None and env.world > 1):
        sharding = ShardedServing(
            devices=args.devices or (env.world if env else 1),
            rank_timeout_s=args.rank_timeout,
            on_rank_failure=args.on_rank_failure,
            max_restarts=args.max_restarts,
            threads=args.threads,
        )
        trust = {
            "trusted_keys": [str(k) for k in args.trusted_key or ()],
            "allow_unsigned_native": args.allow_unsigned_native,
        }
        if env is not None and env.rank != 0:  # a torchrun rank that holds shards and serves no HTTP
            prefix = f"codesign/{env.attempt}/"
            address = ("tcp", env.host, str(env.port))
            return rank_main(env.rank, env.world, address, prefix, str(args.bundle), trust, sharding)
        group = RankGroup(args.bundle, sharding, trust=trust, torchrun=env)
    if args.allow_unsigned_native:
        out().print(
            "[yellow]--allow-unsigned-native: native code in this bundle is loaded without a signature; "
            "anyone who could write the bundle can run code in this server[/]"
        )
    if group is None:
        bundle = load_bundle(
            args.bundle, trusted_keys=args.trusted_key, allow_unsigned_native=args.allow_unsigned_native
        )
    else:
        try:
            bundle = group.start()
        except BaseException:
            group.close()
            raise
    console = out()
    for r in bundle_renderables(bundle)[0]:
        console.print(r)
    batching = BatchingConfig(
        max_requests=args.max_batch_requests,
        max_candidates=args.max_batch_candidates,
        max_delay_ms=args.max_delay_ms,
        max_queued_requests=args.max_queued_requests,
    )
    try:
        runtime = Runtime(bundle, policy=policy_from_args(args), batching=batching, group=group)
        server = Server(runtime, config=config)
    except BaseException:
        if group is not None:
            group.close()
        raise
    if group is not None:
        group.on_exit = server.stop_soon
        if group.exit_code:  # a rank was lost before the server could be told
            server.stop_soon()
        console.print(
            f"sharded across {group.world} ranks: "
            + ", ".join(
                f"rank {r}: pid {i['pid']}, {i['shard_bytes'] / 2**20:.1f} MiB of shards"
                for r, i in group.describe()["ranks"].items()
            ),
            highlight=False,
        )
    console.print(
        f"serving {args.bundle} at [bold]{server.url}[/] (POST /v1/score, /v2/models/{config.model_name}/infer; "
        f"GET /openapi.json /healthz /metrics); ready: {runtime.ready}; SIGTERM or Ctrl-C drains and stops",
        highlight=False,
        soft_wrap=True,  # one line, so that the address is never split
    )
    try:
        server.serve_forever()
    finally:
        if group is not None:
            group.close()
    console.print(f"stopped; {runtime.inflight} requests unanswered")
    if group is not None and group.exit_code:
        console.print(f"[red]{group.problem()}[/]; exiting with code {group.exit_code}", highlight=False)
        return group.exit_code
    return 0
