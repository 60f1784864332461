"""The migration's secret and TLS: nothing is served to a peer without them.

Secret: a token the source reads from ``--secret-file`` (created, mode 0600,
when it does not exist yet) or from ``MIGRATOR_SECRET``; with neither, the source
makes one and prints it once.  Never an option value, so it never shows in
``ps``.  The destination sends it as ``authorization: Bearer <token>`` metadata
on every call; the source's interceptor compares it in constant time and
refuses anything else with UNAUTHENTICATED before any handler runs, so not a
byte of guest memory leaves for a peer without it.

TLS: with a certificate and key the source serves TLS on both channels; with a
CA as well it requires and verifies client certificates (mutual TLS).  The
destination verifies the source against ``--tls-ca`` and presents its own
certificate when given one.
"""

from __future__ import annotations

import hmac
import os
import secrets as _secrets
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from migrator.errors import MigratorError

ENV_SECRET = "MIGRATOR_SECRET"
METADATA_KEY = "authorization"


class ConfigError(MigratorError):
    exit_code = 2


def load_secret(path: str | None, *, create: bool) -> tuple[str | None, bool]:
    """(secret, generated): from the file, else $MIGRATOR_SECRET; create the file if asked."""
    if path:
        try:
            with open(path) as f:
                token = f.read().strip()
            if not token:
                raise ConfigError(f"secret file {path} is empty")
            return token, False
        except FileNotFoundError:
            if not create:
                raise ConfigError(f"secret file {path} does not exist") from None
            token = _secrets.token_urlsafe(24)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            return token, True
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
    token = os.environ.get(ENV_SECRET, "").strip()
    if token:
        return token, False
    if create:
        return _secrets.token_urlsafe(24), True
    return None, False


def call_metadata(secret: str | None) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, f"Bearer {secret}"),) if secret else ()


class SecretInterceptor(grpc.ServerInterceptor):
    """Refuse every call that does not carry the migration's secret, before its body.

    Runs on the call's headers.  A refused call gets a handler that takes its
    request as a stream it never reads (whatever the method's real shape: the
    wire is the same), so no worker waits for a body that may never come and
    nothing is decoded; it answers UNAUTHENTICATED at once.
    """

    def __init__(self, secret: str, on_refused: Callable[[str], None] | None = None) -> None:
        self._expected = f"Bearer {secret}".encode()
        self._on_refused = on_refused

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        try:
            presented = [v for k, v in handler_call_details.invocation_metadata or () if k == METADATA_KEY]
            ok = len(presented) == 1 and hmac.compare_digest(str(presented[0]).encode(errors="replace"), self._expected)
        except Exception:  # noqa: BLE001 - metadata a peer made undecodable: refused like the rest
            presented, ok = ["?"], False
        if ok:
            return continuation(handler_call_details)
        why = "no migration secret presented" if not presented else "wrong migration secret"
        if self._on_refused is not None:
            self._on_refused(why)
        return _REFUSE[why]


def _refuser(why: str) -> grpc.RpcMethodHandler:
    def refuse(_requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover - makes this a generator

    return grpc.stream_stream_rpc_method_handler(refuse)


_REFUSE = {why: _refuser(why) for why in ("no migration secret presented", "wrong migration secret")}


@dataclass(frozen=True)
class TlsFiles:
    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)

    def _read(self, path: str | None, what: str) -> bytes | None:
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read TLS {what} {path}: {exc.strerror}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise ConfigError("TLS on the source needs both --tls-cert and --tls-key")
        cert, key = self._read(self.cert, "certificate"), self._read(self.key, "key")
        ca = self._read(self.ca, "CA")
        assert cert is not None and key is not None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca, "CA"),
            private_key=self._read(self.key, "key"),
            certificate_chain=self._read(self.cert, "certificate"),
        )
