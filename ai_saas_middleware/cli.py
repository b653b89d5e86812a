"""The ``ai-saas`` command line.

::

    ai-saas init [PATH] [--force]            a starter ai-saas-config.yaml; prints its keys once
    ai-saas check-config [FILE]              every problem with its path, or a summary
    ai-saas schema [--output FILE]           the config's JSON Schema, for editors
    ai-saas tenants add ID --tier T [--stripe-customer cus_..]
    ai-saas tenants list | set-tier ID T | add-key ID | revoke-key KEY
    ai-saas usage [--tenant ID] [--month YYYY-MM]
    ai-saas models list [--version N] [--per-million]   the price book in force (or of version N)
    ai-saas models set ID [--input-price USD] [--output-price USD] [--per-million]
                       [--quality Q] [--latency-ms N] [--max-tokens N] [--enable|--disable]
                       [--provider P]            a run-time override: a new price book version
    ai-saas models reset ID                   drop a model's overrides: a new version
    ai-saas spool status [--dir DIR]         spooled and set-aside usage events
    ai-saas spool replay [--rejected]        replay them now (exit 1 while some remain)
    ai-saas redis [--port N]                 a local Redis (embedded Valkey) for development
    ai-saas demo [--framework starlette|flask|django]  app + middleware + traffic + summary
    ai-saas --version

Every command that reads the configuration takes ``-c/--config FILE`` (default
``$AI_SAAS_CONFIG``, else ``./ai-saas-config.yaml``). ``worker``, ``report`` and
``dashboard`` are reserved for the billing worker and its reports (DESIGN.md); they are
not listed in ``--help`` and say that they are not available in this version.

Errors are one line on stderr and a non-zero exit, never a traceback: 2 for a bad
configuration or bad arguments, 1 for anything else (Redis unreachable, unknown tenant).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import textwrap
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from importlib.metadata import PackageNotFoundError, version
from types import FrameType
from typing import Any, NoReturn

from .config import Config, describe, load_config
from .errors import AISaaSError, ConfigError, UnknownTenant

__all__ = ["main"]

DESCRIPTION = (
    "Run and inspect the AI requests of a SaaS app with ai-saas-middleware: write a "
    "starter configuration, check one or print its JSON Schema, manage tenants and their "
    "API keys in Redis, change model prices at run time, read usage back from the usage "
    "streams, replay spooled usage events, run a local Redis for development, or run the "
    "demo.")
EPILOG = (
    "Run 'ai-saas COMMAND --help' for the options of a command. Exit status: 0 on "
    "success, 1 on an error (Redis unreachable, unknown tenant), 2 on a bad configuration "
    "or bad arguments.")
DEFAULT_CONFIG = "ai-saas-config.yaml"
CONFIG_HELP = (f"the configuration file (default: $AI_SAAS_CONFIG if set, else "
               f"./{DEFAULT_CONFIG})")
REDIS_URL_HELP = ("the Redis to use; overrides the config's redis.url (default: redis.url, "
                  "else $REDIS_URL, else redis://127.0.0.1:6379/0)")
DEFAULT_REDIS_PORT = 6379

# Names DESIGN.md gives to commands of pieces still to come: kept so that a script that
# calls them gets a clear answer, but not listed in --help.
RESERVED = {
    "dashboard": "the billing worker's dashboard",
}


def installed_version() -> str:
    """The installed distribution's version (``ai-saas --version``)."""
    try:
        return version("ai-saas-middleware")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse, with each usage error on one line that points at ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.HelpFormatter):
    """Help with room for the longest command name (``check-config``) on its line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=28)

    # Lines break at spaces only: never inside ./ai-saas-config.yaml or --redis-url.
    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse measures subcommand names without their own indent, so the longest
        # name would push its summary to the next line.
        if isinstance(action, argparse._SubParsersAction) and action.choices:
            longest = max(len(name) for name in action.choices)
            self._action_max_length = max(self._action_max_length,
                                          self._current_indent + 2 + longest)


def _config(path: str) -> Config:
    return load_config(path)


def _store(config: Config, url: str | None):  # type: ignore[no-untyped-def]
    from .store.redis import RedisStore

    return RedisStore(config.redis, url or config.redis.url or os.environ.get("REDIS_URL"))


def _table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart (the first row the header)."""
    from .tabulate import table

    return table(rows)


def cmd_init(args: argparse.Namespace) -> int:
    from .starter import StarterExists, write_starter

    try:
        path, starter = write_starter(args.path, force=args.force)
    except StarterExists as exc:  # a refusal to act on the arguments given: exit 2
        print(f"ai-saas: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}: the seed template's tiers ("
          + ", ".join(k.tier for k in starter.keys) + "), routing, cache and billing, "
          "plus 5 model profiles, a tenant per tier, an AI endpoint (/ai/*) and Redis "
          "settings.")
    print()
    print("API keys of the new tenants (shown once, store it now; the file holds only "
          "their sha256 digests):")
    print(_table([["tenant", "tier", "API key"]]
                 + [[k.tenant_id, k.tier, k.api_key] for k in starter.keys]))
    print()
    print(f"Next: review the model prices in it, then 'ai-saas check-config {path}'; "
          "'ai-saas redis' runs a local Redis where it looks for one.")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args.file or args.config)
    print(describe(config))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .schema import render_schema

    text = render_schema()
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise AISaaSError(f"cannot write {args.output}: {exc.strerror or type(exc).__name__}"
                          ) from None
    print(f"wrote {args.output}: the JSON Schema of the configuration. For editors with the "
          "YAML language server, put this line at the top of ai-saas-config.yaml (the path "
          f"is relative to it):\n# yaml-language-server: $schema={_relative(args.output)}")
    return 0


def _relative(path: str) -> str:
    return path if os.path.isabs(path) or path.startswith(".") else f"./{path}"


def cmd_tenants(args: argparse.Namespace) -> int:
    from .tenants import TenantAdmin

    config = _config(args.config)
    store = _store(config, args.redis_url)
    try:
        admin = TenantAdmin(config, store)
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
            rows = [["tenant", "tier", "status", "keys (active/revoked)", "source"]]
            rows += [[t.id, t.tier, "active", f"{len(t.api_key_hashes)}/0", "config"]
                     for t in config.tenants.values()]
            rows += [[s.id, s.tier, s.status, f"{s.active_keys}/{s.revoked_keys}", "redis"]
                     for s in admin.list()]
            print(_table(rows))
            if len(rows) == 1:
                print("no tenants: add some under tenants: in the configuration, or store "
                      "one with 'ai-saas tenants add ID --tier TIER'")
        return 0
    finally:
        store.close()


_MONTH_RE = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def _month(text: str) -> str:
    # [0-9], not \d: \d also matches other scripts' digits, which no event's ts holds.
    if _MONTH_RE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"expected YYYY-MM, a year and a month 01 to 12 (e.g. 2026-03), found {text!r}")
    return text


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0 to 65535 (0: any free "
                                         f"port), found {text!r}")
    return int(text)


def _tenant_tier(config: Config, store: Any, keys: Any, tenant_id: str) -> str | None:
    """The tier of a tenant of the config or stored in Redis; None when it is neither."""
    from .store.keys import is_valid_tenant_id

    if tenant_id in config.tenants:
        return config.tenants[tenant_id].tier
    if not is_valid_tenant_id(tenant_id):
        return None
    tier = store.call("HGET", keys.tenant(tenant_id).record, "tier")
    if tier is None:
        return None
    return tier.decode() if isinstance(tier, bytes) else str(tier)


def cmd_usage(args: argparse.Namespace) -> int:
    from .report import TenantUsage, format_table, summarize, usage_events
    from .store.keys import KeySchema, is_valid_tenant_id

    config = _config(args.config)
    store = _store(config, args.redis_url)
    try:
        keys = KeySchema(config.redis.key_prefix, config.redis.shards)
        ledger = config.billing.database
        tenant: str | None = args.tenant
        tier = _tenant_tier(config, store, keys, tenant) if tenant is not None else None
        if tenant is not None and tier is None:
            # A tenant since removed from the config still has its usage shown.
            rows = summarize(usage_events(store, keys, ledger, tenant_id=tenant,
                                          month=args.month)) \
                if is_valid_tenant_id(tenant) else {}
            if not rows:
                raise UnknownTenant(f"no tenant {tenant!r}: it is neither in "
                                    f"{config.source} nor stored in Redis")
        else:
            rows = summarize(usage_events(store, keys, ledger, tenant_id=tenant,
                                          month=args.month))
        when = f" in {args.month}" if args.month else ""
        if tenant is not None and not rows:
            rows = {tenant: TenantUsage(tenant, tier=tier or "")}
            print(format_table(rows))
            print(f"no usage recorded for tenant {tenant!r}{when}.")
        else:
            print(format_table(rows))
            if not rows:
                print(f"no usage recorded{when}.")
        return 0
    finally:
        store.close()


def _usd(text: str) -> Decimal:
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError(f"expected a price in USD, a decimal number >= 0 "
                                         f"(e.g. 0.0000025, or 2.5 with --per-million), "
                                         f"found {text!r}")
    return amount


def _quality(text: str) -> Decimal:
    try:
        score = Decimal(text.strip())
    except InvalidOperation:
        score = Decimal("NaN")
    if not score.is_finite() or not 0 <= score <= 1:
        raise argparse.ArgumentTypeError(f"expected a quality score, a decimal number from "
                                         f"0 to 1, found {text!r}")
    return score


def _whole(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {text!r}")
    return int(text)


def _version(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a price book version, a whole number "
                                         f">= 0, found {text!r}")
    return int(text)


def _price_cell(amount: Decimal, per_million: bool) -> str:
    from .pricing import MONEY, format_usd

    return format_usd(MONEY.scaleb(amount, 6) if per_million else amount)


def cmd_models(args: argparse.Namespace) -> int:
    from .pricebook import PriceBookAdmin, per_million

    config = _config(args.config)
    store = _store(config, args.redis_url)
    try:
        admin = PriceBookAdmin(config, store)
        if args.action == "list":
            problems: list[str] = []
            if args.version is None:
                snapshot, problems = admin.read()
            else:
                snapshot = admin.at_version(args.version)
            _print_models(config, snapshot, args.per_million)
            for problem in problems:
                print(f"ai-saas: a stored override is not used: {problem}", file=sys.stderr)
            return 0
        if args.action == "reset":
            after = admin.reset(args.id)
            if after is None:
                print(f"model {args.id} has no overrides: the price book stays at version "
                      f"{admin.read()[0].version}.")
            else:
                print(f"model {args.id}: overrides dropped; price book version "
                      f"{after.version} (serving processes follow within about 2 seconds).")
            return 0
        fields: dict[str, Any] = {}
        scale = per_million if args.per_million else (lambda amount: amount)
        if args.input_price is not None:
            fields["costPerInputToken"] = scale(args.input_price)
        if args.output_price is not None:
            fields["costPerOutputToken"] = scale(args.output_price)
        if args.quality is not None:
            fields["qualityScore"] = args.quality
        if args.latency_ms is not None:
            fields["latencyP99Ms"] = args.latency_ms
        if args.max_tokens is not None:
            fields["maxTokens"] = args.max_tokens
        if args.provider is not None:
            fields["provider"] = args.provider
        if args.enabled is not None:
            fields["enabled"] = args.enabled
        if not fields:
            print("ai-saas models set: error: nothing to set: give at least one of "
                  "--input-price, --output-price, --quality, --latency-ms, --max-tokens, "
                  "--enable, --disable (see 'ai-saas models set --help')", file=sys.stderr)
            return 2
        if args.per_million and "costPerInputToken" not in fields \
                and "costPerOutputToken" not in fields:
            print("ai-saas models set: error: --per-million applies to --input-price and "
                  "--output-price, and neither is given", file=sys.stderr)
            return 2
        after = admin.set(args.id, fields)
        state = "disabled" if args.id in after.disabled else "enabled"
        print(f"model {args.id} ({state}): price book version {after.version} (serving "
              "processes follow within about 2 seconds).")
        _print_models(config, _only(after, args.id), args.per_million, header=False)
        if args.id not in config.models and not any(
                args.id in tier.allowed_models for tier in config.tiers.values()):
            print(f"note: no tier allows {args.id} (tenant.tiers[].allowedModels), so routing "
                  "does not choose it.")
        return 0
    finally:
        store.close()


def _only(snapshot: Any, model_id: str) -> Any:
    from .pricebook import PriceSnapshot

    return PriceSnapshot(snapshot.version,
                         {k: v for k, v in snapshot.models.items() if k == model_id},
                         {k: v for k, v in snapshot.overrides.items() if k == model_id},
                         frozenset(m for m in snapshot.disabled if m == model_id))


def _print_models(config: Config, snapshot: Any, per_million: bool, header: bool = True
                  ) -> None:
    from .pricebook import effective_profile

    unit = "$/1M" if per_million else "$/token"
    rows = [["model", "provider", f"input {unit}", f"output {unit}", "max tokens", "quality",
             "p99 ms", "state", "overridden"]]
    order = [*snapshot.models, *sorted(snapshot.disabled)]
    for model_id in order:
        fields = snapshot.overrides.get(model_id, {})
        overridden = ", ".join(snapshot.overridden(model_id)) or "-"
        profile = snapshot.models.get(model_id)
        if profile is None:  # disabled, so absent from the book: show what it would be
            profile = effective_profile(config, model_id,
                                        {k: v for k, v in fields.items() if k != "enabled"})
        if profile is None:
            continue
        cells = [profile.provider, _price_cell(profile.cost_per_input_token, per_million),
                 _price_cell(profile.cost_per_output_token, per_million),
                 str(profile.max_tokens), f"{profile.quality_score:g}",
                 str(profile.latency_p99_ms)]
        state = "disabled" if model_id in snapshot.disabled else "enabled"
        rows.append([model_id, *cells, state, overridden])
    if header:
        print(f"price book version {snapshot.version}"
              + (" (the configuration's profiles)" if snapshot.version == 0 else ""))
    if len(rows) == 1:
        print("no models: add profiles under models: in the configuration")
        return
    print(_table(rows))


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


class _Stop(Exception):
    """Raised by ``ai-saas redis``'s signal handler to leave the wait for the server."""


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server will: a port left in TIME_WAIT is free; a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def cmd_redis(args: argparse.Namespace) -> int:
    """A local Redis-compatible server in the foreground, until SIGINT or SIGTERM."""
    from .embedded import start_server

    port: int | None = args.port or None
    # start_server's readiness check PINGs the port: another server already on it would
    # answer for ours, so a taken port is refused before anything starts.
    if port is not None and _port_in_use(port):
        raise AISaaSError(f"port {port} on 127.0.0.1 is in use (another Redis?): choose "
                          "another with --port N, or --port 0 for any free port")
    received: list[int] = []
    armed = [False]

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Raises only while main waits on the server: a signal during start-up or
        # shutdown is remembered, so the server is never left running unstopped.
        received.append(signum)
        if armed[0]:
            armed[0] = False
            raise _Stop

    previous = {signum: signal.signal(signum, on_signal)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server = start_server(port=port, prefer="embedded")
        except RuntimeError as exc:
            raise AISaaSError(str(exc)) from None
        exit_code: int | None = None
        last_log = ""
        try:
            print(f"{server.name} is serving {server.url} for local development "
                  "(no password; its data goes when it stops).", flush=True)
            print(f"Use it:  export REDIS_URL={server.url}   (a redis.url in the "
                  "configuration takes precedence)", flush=True)
            print("Stop it: Ctrl-C", flush=True)
            try:
                armed[0] = True
                if received:
                    armed[0] = False
                    raise _Stop
                exit_code = server.process.wait()
                armed[0] = False
            except _Stop:
                pass
            if exit_code is not None:
                last_log = _last_line(os.path.join(server.directory, "server.log"))
        finally:
            armed[0] = False
            server.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # A Ctrl-C in a terminal reaches the server too (same process group): a server that
    # stopped cleanly or on a signal is a normal end.
    if exit_code in (None, 0, -signal.SIGINT, -signal.SIGTERM):
        print("stopped.", flush=True)
        return 0
    raise AISaaSError(f"the server exited by itself (exit code {exit_code}): {last_log}")


def _last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            lines = [line.strip() for line in log if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


def cmd_reserved(name: str) -> int:
    print(f"ai-saas: '{name}' is not available in this version "
          f"(ai-saas-middleware {installed_version()}): it is reserved for "
          f"{RESERVED[name]}, which has not landed yet.", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``ai-saas`` argument parser (every argument and option with its help)."""
    parser = _Parser(prog="ai-saas", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version",
                        version=f"ai-saas (ai-saas-middleware) {installed_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    default_config = os.environ.get("AI_SAAS_CONFIG") or DEFAULT_CONFIG

    def with_config(p: argparse.ArgumentParser, redis: bool = True) -> None:
        p.add_argument("--config", "-c", default=default_config, metavar="FILE",
                       help=CONFIG_HELP)
        if redis:
            p.add_argument("--redis-url", default=None, metavar="URL", help=REDIS_URL_HELP)

    def command(subparsers: Any, name: str, summary: str, details: str = ""
                ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = subparsers.add_parser(
            name, help=summary, description=summary[0].upper() + summary[1:] + "."
            + (" " + details if details else ""))
        return p

    p = command(sub, "init", "write a starter configuration file and print its API keys",
                "The file is the seed template (tiers, routing, cache, billing) plus what "
                "serving needs: model profiles at list prices, a tenant per tier, an AI "
                "endpoint and Redis settings; it passes check-config as written. Each "
                "tenant's new API key is printed once: the file holds only its sha256 "
                "digest. An existing file is left alone (exit 2) unless --force.")
    p.add_argument("path", nargs="?", default=default_config, metavar="PATH",
                   help=f"where to write it (default: $AI_SAAS_CONFIG if set, else "
                        f"./{DEFAULT_CONFIG}; a directory: {DEFAULT_CONFIG} in it)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing file (the keys of its tenants stop working)")
    p.set_defaults(func=cmd_init)

    p = command(sub, "check-config", "validate a configuration file",
                "Lists every problem at once, each with its path, and exits 2; for a good "
                "file prints the tiers, models and endpoints and what a serving "
                "deployment still lacks.")
    p.add_argument("file", nargs="?", default=None, metavar="FILE",
                   help="the file to check (default: the --config file)")
    with_config(p, redis=False)
    p.set_defaults(func=cmd_check_config)

    p = command(sub, "schema", "print the JSON Schema of the configuration, for editors",
                "A JSON Schema (draft 2020-12) of ai-saas-config.yaml, made from the "
                "loader's own definitions, with which editors check and complete the file "
                "as it is typed: with the YAML language server, write it next to the "
                "config and put '# yaml-language-server: $schema=./ai-saas-config.schema"
                ".json' on the config's first line. check-config still checks what needs "
                "the whole file (tiers named, model profiles, ids used once).")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="write it to FILE, replacing it (default: print it on stdout)")
    p.set_defaults(func=cmd_schema)

    p = command(sub, "tenants", "manage tenants stored in Redis and their API keys",
                "Tenants of the configuration file are changed by editing it.")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    a = command(tsub, "add", "store a tenant and print its first API key")
    a.add_argument("id", metavar="ID",
                   help="the new tenant's id: 1 to 64 characters of A-Z a-z 0-9 _ . -")
    a.add_argument("--tier", required=True, help="its tier: a name of tenant.tiers")
    a.add_argument("--stripe-customer", default=None, metavar="CUS_ID",
                   help="its Stripe customer id (cus_...), for billing")
    with_config(a)
    a = command(tsub, "list", "list the tenants of the config and those stored in Redis")
    with_config(a)
    a = command(tsub, "set-tier", "move a stored tenant to another tier")
    a.add_argument("id", metavar="ID", help="the stored tenant's id")
    a.add_argument("tier", metavar="TIER", help="its new tier: a name of tenant.tiers")
    with_config(a)
    a = command(tsub, "add-key", "print a new API key for a stored tenant")
    a.add_argument("id", metavar="ID", help="the stored tenant's id")
    with_config(a)
    a = command(tsub, "revoke-key", "revoke an API key of a stored tenant",
                "Refused at once by every serving process.")
    a.add_argument("key", metavar="KEY",
                   help="the key itself (ais_...), or sha256:<hex> of it with --tenant")
    a.add_argument("--tenant", default=None, metavar="ID",
                   help="the key's tenant (needed when KEY is a sha256: hash)")
    with_config(a)
    p.set_defaults(func=cmd_tenants)

    p = command(sub, "usage", "show usage per tenant, read back from the usage streams")
    p.add_argument("--tenant", default=None, metavar="ID",
                   help="only this tenant (of the config, or stored in Redis)")
    p.add_argument("--month", default=None, type=_month, metavar="YYYY-MM",
                   help="only this month, UTC (default: every month)")
    with_config(p)
    p.set_defaults(func=cmd_usage)

    p = command(sub, "models", "show or change the model profiles in force (the price book)",
                "The configuration's models, overridden field by field at run time: "
                "prices, quality, latency, context window, enabled. Every change is a new "
                "price book version, which every serving process follows within about 2 "
                "seconds and every usage event records (price_version).")
    msub = p.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    a = command(msub, "list", "list the effective profiles, their overridden fields and "
                              "the version")
    a.add_argument("--version", type=_version, default=None, metavar="N",
                   help="the price book of version N instead (0: the configuration's), "
                        "rebuilt from the history: the prices an event with that "
                        "price_version was costed with")
    a.add_argument("--per-million", action="store_true",
                   help="show prices in USD per million tokens (default: per token)")
    with_config(a)
    a = command(msub, "set", "override fields of a model's profile: a new version",
                "Fields not given keep their current value (overridden or the "
                "configuration's). A model the configuration lacks needs every field: "
                "--provider, both prices, --max-tokens, --quality, --latency-ms.")
    a.add_argument("id", metavar="ID", help="the model's id")
    a.add_argument("--input-price", type=_usd, default=None, metavar="USD",
                   help="USD per input (prompt) token, an exact decimal")
    a.add_argument("--output-price", type=_usd, default=None, metavar="USD",
                   help="USD per output (completion) token, an exact decimal")
    a.add_argument("--per-million", action="store_true",
                   help="the prices given are USD per million tokens")
    a.add_argument("--quality", type=_quality, default=None, metavar="Q",
                   help="quality score, 0 to 1")
    a.add_argument("--latency-ms", type=_whole, default=None, metavar="N",
                   help="p99 latency, ms")
    a.add_argument("--max-tokens", type=_whole, default=None, metavar="N",
                   help="context window, tokens")
    a.add_argument("--provider", default=None, metavar="P",
                   help="its provider (only for a model the configuration lacks)")
    state = a.add_mutually_exclusive_group()
    state.add_argument("--enable", dest="enabled", action="store_const", const=True,
                       default=None, help="let routing choose it again")
    state.add_argument("--disable", dest="enabled", action="store_const", const=False,
                       help="take it out of routing (absent from the price book)")
    with_config(a)
    a = command(msub, "reset", "drop every override of a model: a new version")
    a.add_argument("id", metavar="ID", help="the model's id")
    with_config(a)
    p.set_defaults(func=cmd_models)

    p = command(sub, "spool", "show or replay usage events waiting for Redis",
                "Events that could not be written while Redis was unreachable wait in the "
                "spool directory; those Redis refused for good are set aside.")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    dir_help = "the spool directory (default: the config's redis.spoolDir)"
    a = command(ssub, "status", "show pending, being replayed and set-aside entries")
    a.add_argument("--dir", default=None, help=dir_help)
    with_config(a, redis=False)
    a = command(ssub, "replay", "replay pending entries now (exit 1 while some remain)")
    a.add_argument("--dir", default=None, help=dir_help)
    a.add_argument("--rejected", action="store_true",
                   help="also retry the set-aside entries; those written leave rejected.jsonl")
    with_config(a)
    p.set_defaults(func=cmd_spool)

    p = command(sub, "redis", "run a local Redis for development, until Ctrl-C",
                "Starts the embedded Valkey (else redis-server from PATH) on 127.0.0.1, "
                "without persistence or password, prints its URL and how to use it, and "
                "stops it on Ctrl-C or SIGTERM. Not for production.")
    p.add_argument("--port", type=_port, default=DEFAULT_REDIS_PORT, metavar="N",
                   help=f"the port to listen on (default: {DEFAULT_REDIS_PORT}, where "
                        "redis.url points when it is not set; 0: any free port)")
    p.set_defaults(func=cmd_redis)

    from .billing.commands import add_commands

    add_commands(sub, command, with_config, _month)

    p = command(sub, "demo", "run the demo: app + middleware + traffic + summary")
    from .demo import DEMO_APPS

    p.add_argument("--framework", default="starlette", choices=sorted(DEMO_APPS),
                   help="the demo app's framework (default: starlette)")
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help="a Redis to use (default: $REDIS_URL, else an embedded server)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ai-saas`` with ``argv`` (default: the process's arguments); the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args_list:
        parser.print_help(sys.stderr)
        return 2
    if args_list[0] in RESERVED:  # before argparse, which would list it as a choice
        return cmd_reserved(args_list[0])
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version, a usage error: already printed
        return exc.code if isinstance(exc.code, int) else 2
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
