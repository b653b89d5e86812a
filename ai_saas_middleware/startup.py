"""The start-up check of a gateway: one WARNING when Redis does not answer.

A gateway talks to Redis only when the first AI request comes, so a wrong URL or a
Redis that is not running would otherwise show only then, as refusals or as requests
quietly served from the per-process allowance. :func:`check_redis_at_startup` sends one
``PING`` when a gateway is built and, when it gets no answer, logs one WARNING naming
the URL (its password redacted) and what the gateway will do meanwhile
(``onUnavailable``). It never fails start-up and never delays it by more than the
configured ``redis.connectTimeout``::

    WARNING ai_saas_middleware: Redis at redis://***@10.0.0.5:6379/0 did not answer at
    start-up (ConnectionError: ...); until it does, AI requests are served within each
    process's local allowance and their usage is spooled to disk (redis.onUnavailable:
    open)

The PING runs in a thread of its own and the caller waits for it at most the connect
timeout: an answer or a refused connection comes at once (then the warning is logged
before the gateway's constructor returns, in order with the app's other start-up
lines); only a host that drops packets, or a slow one, makes it wait that long, and a
probe still running then logs its warning itself if it fails. The wait is the same with
an event loop running (Starlette builds its middleware, and so the gateway, on the first
request): the loop is held at most the connect timeout, once per gateway. Not waiting
there was weighed and left: the warning would then come at a moment nobody can tell,
interleaved with the first requests' log lines (and their Redis commands).
"""

from __future__ import annotations

import logging
import threading

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import Config
from .store.redis import DEFAULT_URL, _redact, _split_url

__all__ = ["check_redis_at_startup"]

log = logging.getLogger("ai_saas_middleware")


def _meanwhile(config: Config) -> str:
    """What a gateway does while Redis is unreachable, in words (the policy and the
    tiers that override it)."""
    policy = config.redis.on_unavailable
    served = ("AI requests are served within each process's local allowance and their "
              "usage is spooled to disk")
    refused = "AI requests are refused with 503"
    text = f"{served if policy == 'open' else refused} (redis.onUnavailable: {policy})"
    others = sorted(t.name for t in config.tiers.values()
                    if t.on_unavailable is not None and t.on_unavailable != policy)
    if others:
        other = "closed" if policy == "open" else "open"
        text += f"; tiers {', '.join(others)}: onUnavailable {other}"
    return text


def _ping(config: Config, url: str) -> None:
    """PING ``url`` once; log a warning when it fails. Never raises."""
    cfg = config.redis
    _cluster, plain = _split_url(url)  # a cluster's seed node answers PING too
    client = None
    try:
        client = redis.Redis.from_url(
            plain, socket_connect_timeout=cfg.connect_timeout_s,
            socket_timeout=cfg.socket_timeout_s, health_check_interval=0,
            retry=Retry(NoBackoff(), 0))  # one attempt: redis-py retries 3 times by default
        client.ping()
    except Exception as exc:  # any failure is "did not answer"; start-up goes on
        # redis-py's messages name host and port, never the password.
        log.warning("Redis at %s did not answer at start-up (%s: %s); until it does, %s",
                    _redact(url), type(exc).__name__, exc, _meanwhile(config))
    finally:
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - closing a failed client
                pass


def check_redis_at_startup(config: Config, url: str | None) -> threading.Thread:
    """Check that Redis answers, warning once when it does not (see the module).

    Args:
        config: the gateway's configuration (``redis`` section, tiers' policies).
        url: the URL the gateway uses (else ``redis.url``, else localhost).

    Returns:
        The probe's thread (finished, unless Redis took longer than the connect timeout).
    """
    target = url or config.redis.url or DEFAULT_URL
    probe = threading.Thread(target=_ping, args=(config, target), daemon=True,
                             name="ai-saas-redis-startup-check")
    probe.start()
    probe.join(config.redis.connect_timeout_s)
    return probe
