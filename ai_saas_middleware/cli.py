"""The ``ai-saas`` command.

::

    ai-saas check-config FILE                 every problem with its path, or a summary
    ai-saas tenants add ID --tier T [--stripe-customer cus_..] --config FILE
    ai-saas tenants list | set-tier ID T | add-key ID | revoke-key KEY --config FILE
    ai-saas usage [--tenant ID] [--month YYYY-MM] --config FILE
    ai-saas demo [--framework starlette|flask|django]  app + middleware + traffic + summary

Errors are one line on stderr and a non-zero exit, never a traceback: 2 for a bad
configuration or bad arguments, 1 for anything else (Redis unreachable, unknown tenant).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

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
