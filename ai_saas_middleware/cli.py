"""The ``ai-saas`` command.

::

    ai-saas check-config FILE                 every problem with its path, or a summary
    ai-saas tenants add ID --tier T [--stripe-customer cus_..] --config FILE
    ai-saas tenants list | set-tier ID T | add-key ID | revoke-key KEY --config FILE
    ai-saas usage [--tenant ID] [--month YYYY-MM] --config FILE
    ai-saas demo [--framework starlette|flask|django]  app + middleware + traffic + summary
    ai-saas spool status [--dir DIR] --config FILE  spooled and set-aside usage events
    ai-saas spool replay [--rejected] --config FILE  replay them now (exit 1 while some remain)

Errors are one line on stderr and a non-zero exit, never a traceback: 2 for a bad
configuration or bad arguments, 1 for anything else (Redis unreachable, unknown tenant).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .config import Config, describe, load_config
from .errors import AISaaSError, ConfigError

__all__ = ["main"]


def _config(path: str) -> Config:
    return load_config(path)


def _store(config: Config, url: str | None):  # type: ignore[no-untyped-def]
    from .store.redis import RedisStore

    return RedisStore(config.redis, url or config.redis.url or os.environ.get("REDIS_URL"))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args.file)
    print(describe(config))
    return 0


def cmd_tenants(args: argparse.Namespace) -> int:
    from .tenants import TenantAdmin

    config = _config(args.config)
    admin = TenantAdmin(config, _store(config, args.redis_url))
    if args.action == "add":
        key = admin.add(args.id, args.tier, args.stripe_customer)
        print(f"tenant {args.id} added on tier {args.tier}.")
        print(f"API key (shown once, store it now): {key}")
    elif args.action == "add-key":
        print(f"API key (shown once, store it now): {admin.add_key(args.id)}")
    elif args.action == "set-tier":
        admin.set_tier(args.id, args.tier)
        print(f"tenant {args.id} is now on tier {args.tier} (serving processes see it "
              "within 5 minutes, at once on a tier mismatch).")
    elif args.action == "revoke-key":
        tenant = admin.revoke_key(args.key, args.tenant)
        print(f"key revoked for tenant {tenant}.")
    else:
        stored = admin.list()
        print(f"{'tenant':<24} {'tier':<12} {'status':<10} keys (active/revoked)  source")
        for t in config.tenants.values():
            print(f"{t.id:<24} {t.tier:<12} {'active':<10} "
                  f"{len(t.api_key_hashes)}/0{'':<17} config")
        for s in stored:
            print(f"{s.id:<24} {s.tier:<12} {s.status:<10} "
                  f"{s.active_keys}/{s.revoked_keys}{'':<17} redis")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from .report import format_table, read_events, summarize
    from .store.keys import KeySchema

    config = _config(args.config)
    store = _store(config, args.redis_url)
    keys = KeySchema(config.redis.key_prefix, config.redis.shards)
    rows = summarize(read_events(store, keys, tenant_id=args.tenant, month=args.month))
    print(format_table(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(framework=args.framework, redis_url=args.redis_url)


def _spool(config: Config, directory: str | None):  # type: ignore[no-untyped-def]
    from .spool import Spool
    from .store.keys import KeySchema

    redis = config.redis
    return Spool(directory or redis.spool_dir or Spool.default_dir(redis.key_prefix),
                 KeySchema(redis.key_prefix, redis.shards))


def cmd_spool(args: argparse.Namespace) -> int:
    config = _config(args.config)
    spool = _spool(config, args.dir)
    if args.action == "status":
        status = spool.status()
        print(f"spool directory {status.directory}")
        print(f"pending: {sum(status.pending.values())} entries in {len(status.pending)} "
              f"files; being replayed: {sum(status.claims.values())} entries in "
              f"{len(status.claims)} files (*.replaying)")
        for name, count in {**status.pending, **status.claims}.items():
            print(f"  {name}: {count}")
        print(f"set aside: {len(status.set_aside)} entries (rejected.jsonl)")
        for request_id, tenant, error in status.set_aside:
            print(f"  {request_id}  tenant {tenant}: {error}")
        if status.per_tenant:
            print(f"{'tenant':<24} {'pending':>8} {'set aside':>10}")
            for tenant, (waiting, aside) in status.per_tenant.items():
                print(f"{tenant:<24} {waiting:>8} {aside:>10}")
        return 0
    store = _store(config, args.redis_url)
    try:
        def run(call: tuple[str, list[str], list[Any]]) -> Any:
            return store.run_script(*call)

        spool.replay(run)
        left = spool.status()
        waiting = sum(left.pending.values()) + sum(left.claims.values())
        print(f"replayed the spool: {waiting} entries still pending")
        code = 0 if waiting == 0 else 1
        if args.rejected:
            written, kept = spool.retry_set_aside(run)
            print(f"set-aside entries: {written} written, {kept} still set aside")
            code = code or (0 if kept == 0 else 1)
        elif left.set_aside:
            print(f"{len(left.set_aside)} entries are set aside (retry them with --rejected)")
        if waiting and store.health.is_down():
            print(f"ai-saas: Redis is unavailable ({store.health.last_error}); "
                  f"{waiting} entries kept for the next replay", file=sys.stderr)
        return code
    finally:
        store.close()


def cmd_later(args: argparse.Namespace) -> int:
    print(f"ai-saas {args.command}: not available yet in this version (it arrives with the "
          "billing worker).", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ai-saas", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", default=os.environ.get("AI_SAAS_CONFIG",
                                                                "ai-saas-config.yaml"))
        p.add_argument("--redis-url", default=None,
                       help="overrides redis.url (else REDIS_URL, else localhost)")

    p = sub.add_parser("tenants", help="manage tenants stored in Redis")
    tsub = p.add_subparsers(dest="action", required=True)
    a = tsub.add_parser("add", help="store a tenant and print its first API key")
    a.add_argument("id")
    a.add_argument("--tier", required=True)
    a.add_argument("--stripe-customer", default=None)
    with_config(a)
    a = tsub.add_parser("list", help="tenants in the config and in Redis")
    with_config(a)
    a = tsub.add_parser("set-tier", help="move a stored tenant to another tier")
    a.add_argument("id")
    a.add_argument("tier")
    with_config(a)
    a = tsub.add_parser("add-key", help="print a new API key for a stored tenant")
    a.add_argument("id")
    with_config(a)
    a = tsub.add_parser("revoke-key", help="revoke a key (the key, or sha256:<hex> --tenant)")
    a.add_argument("key")
    a.add_argument("--tenant", default=None)
    with_config(a)
    p.set_defaults(func=cmd_tenants)

    p = sub.add_parser("usage", help="usage per tenant, read back from the streams")
    p.add_argument("--tenant", default=None)
    p.add_argument("--month", default=None, help="YYYY-MM")
    with_config(p)
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("demo", help="run the demo: app + middleware + traffic + summary")
    from .demo import DEMO_APPS

    p.add_argument("--framework", default="starlette", choices=sorted(DEMO_APPS))
    p.add_argument("--redis-url", default=None,
                   help="a Redis to use (else REDIS_URL, else an embedded server)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("spool", help="usage events waiting for Redis, and those set aside")
    ssub = p.add_subparsers(dest="action", required=True)
    a = ssub.add_parser("status", help="pending, being replayed and set-aside entries")
    a.add_argument("--dir", default=None, help="the spool directory (else redis.spoolDir)")
    with_config(a)
    a = ssub.add_parser("replay", help="replay pending entries now (exit 1 while some remain)")
    a.add_argument("--dir", default=None, help="the spool directory (else redis.spoolDir)")
    a.add_argument("--rejected", action="store_true",
                   help="also retry the set-aside entries; those written leave rejected.jsonl")
    with_config(a)
    p.set_defaults(func=cmd_spool)

    for name in ("worker", "report", "dashboard"):
        p = sub.add_parser(name, help="(arrives with the billing worker)")
        p.set_defaults(func=cmd_later)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except AISaaSError as exc:
        print(f"ai-saas: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # piped into head, less ...: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
