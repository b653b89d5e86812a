"""What a Redis error reply means for us: an outage, or a refusal that can never succeed.

One classification, used by both stores (:class:`~.redis.RedisStore` through redis-py's
parser, :class:`~.redis.AsyncRedisStore` through hiredis), decided by the reply's first
word (redis-py strips that word and answers a class of its own for some codes, so those
classes are read as the word they stand for):

=============  =======================================================  ===========
first word     when Redis answers it                                    kind
=============  =======================================================  ===========
READONLY       a replica (a failover in progress, a stale address)      OUTAGE
OOM            ``maxmemory`` reached with a ``noeviction`` policy       OUTAGE
LOADING        the dataset is being loaded after a restart              OUTAGE
BUSY           a script or module command holds the server              OUTAGE
MASTERDOWN     a replica lost its master (replica-serve-stale-data no)  OUTAGE
TRYAGAIN       a cluster slot is being migrated                         OUTAGE
CLUSTERDOWN    the cluster cannot serve the slot                        OUTAGE
NOREPLICAS     ``min-replicas-to-write`` is not met                     OUTAGE
MISCONF        RDB snapshots fail and ``stop-writes-on-bgsave-error``   OUTAGE
NOAUTH         no password sent, or the wrong one: every call would     AUTH
WRONGPASS      fail the same way until an operator fixes the            AUTH
NOPERM         configuration or the ACL                                 AUTH
anything else  WRONGTYPE, ERR (a script error), EXECABORT, CROSSSLOT..  PERMANENT
=============  =======================================================  ===========

- ``OUTAGE``: the call may well succeed later. The store is marked down for
  ``redis.retryInterval`` exactly as after a connection failure and answers
  :class:`~ai_saas_middleware.errors.StoreError`: admission follows ``onUnavailable``,
  settlement is spooled and replayed later.
- ``AUTH``: an outage too (nothing can succeed until it is fixed, and then everything
  does), but a misconfiguration rather than bad luck, so it is logged as an error.
- ``PERMANENT``: :class:`~ai_saas_middleware.errors.StoreRefused`. Retrying the same call
  cannot help (the key holds another type, the script failed on its arguments): the
  store is *not* marked down, the admission follows ``onUnavailable`` for that request
  alone, and a settlement is set aside in the spool's ``rejected.jsonl``, loudly.
"""

from __future__ import annotations

import enum

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)

__all__ = ["AUTH_CODES", "OUTAGE_CODES", "ReplyKind", "classify_reply"]


class ReplyKind(enum.Enum):
    """What an error reply means (see the module's table)."""

    OUTAGE = "outage"
    AUTH = "auth"
    PERMANENT = "permanent"


OUTAGE_CODES = frozenset({"READONLY", "OOM", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN",
                          "CLUSTERDOWN", "NOREPLICAS", "MISCONF"})
AUTH_CODES = frozenset({"NOAUTH", "WRONGPASS", "NOPERM"})

# redis-py's parser drops the first word of these codes and raises its own class instead.
_OUTAGE_CLASSES = (ReadOnlyError, OutOfMemoryError, BusyLoadingError, TryAgainError,
                   ClusterDownError)  # MasterDownError is a ClusterDownError
_AUTH_CLASSES = (AuthenticationError, AuthorizationError, NoPermissionError)


def classify_reply(error: BaseException | str) -> ReplyKind:
    """The kind of an error reply: a driver exception, or the reply's text.

    Args:
        error: redis-py's exception for the reply (its class is read where redis-py
            maps the code to one), or hiredis's ``ResponseError``, or the raw text.

    Returns:
        :attr:`ReplyKind.OUTAGE`, :attr:`ReplyKind.AUTH` or :attr:`ReplyKind.PERMANENT`.
    """
    if isinstance(error, BaseException):
        if isinstance(error, _AUTH_CLASSES):
            return ReplyKind.AUTH
        if isinstance(error, _OUTAGE_CLASSES):
            return ReplyKind.OUTAGE
        error = str(error)
    code = error.split(" ", 1)[0]
    if code in OUTAGE_CODES:
        return ReplyKind.OUTAGE
    if code in AUTH_CODES:
        return ReplyKind.AUTH
    return ReplyKind.PERMANENT
