"""The whole error tree of cardvault.

Every error that can reach a caller is a leaf of this tree. A leaf carries a stable
machine ``code``, an HTTP status, and a Stripe error ``type``; the HTTP layer renders it
as Stripe's error object::

    {"error": {"type": ..., "code": ..., "message": ..., "param": ..., "request_log_url": ...}}

Client errors say what to fix. Internal errors say nothing about the inside. No message
ever repeats the caller's input, because that input may be a card number or a CVC:
messages are written here, from constants, and ``param`` names a parameter, never a value.

::

    CardVaultError
    ├── APIError                         api_error              500
    │   ├── ServiceUnavailable           api_error              503  service_unavailable
    │   │   ├── KeyServiceUnavailable    api_error              503  keyservice_unavailable
    │   │   ├── AuditUnavailableError    api_error              503  audit_unavailable
    │   │   ├── KeyServiceSealed         api_error              503  keyservice_sealed
    │   │   ├── DatabaseUnavailable      api_error              503  database_unavailable
    │   │   │   └── StorageFull          api_error              503  storage_full
    │   │   └── TooManyConnections       api_error              503  too_many_connections
    │   ├── ForwardingDestinationError   api_error              502  forwarding_destination_error
    │   └── ConfigurationError           (start-up only; never rendered with details)
    ├── InvalidRequestError              invalid_request_error  400  parameter_invalid
    │   ├── ParameterMissing                                    400  parameter_missing
    │   ├── ParameterUnknown                                    400  parameter_unknown
    │   ├── ResourceMissing                                     404  resource_missing
    │   ├── ImportRefused                                       400  import_refused (+ reason)
    │   ├── ExportRefused                                       403  export_refused (+ reason)
    │   ├── UrlNotFound                                         404  url_invalid
    │   ├── CiphertextInvalid                                   400  ciphertext_invalid
    │   │   └── KeyVersionUnavailable                           410  key_version_unavailable
    │   ├── UnsealShareInvalid                                  400  unseal_share_invalid
    │   ├── MalformedRequest                                    400  request_malformed
    │   ├── MethodNotAllowed                                    405  method_not_allowed
    │   ├── RequestTimeout                                      408  request_timeout
    │   ├── RequestTooLarge                                     413  request_too_large
    │   ├── UriTooLong                                          414  uri_too_long
    │   ├── RequestHeaderFieldsTooLarge                         431  request_header_fields_too_large
    │   └── UnsupportedMediaType                                415  unsupported_media_type
    ├── CardError                        card_error             402  card_declined
    │   ├── IncorrectNumber                                     402  incorrect_number
    │   ├── InvalidNumber                                       402  invalid_number
    │   ├── InvalidExpiryMonth                                  402  invalid_expiry_month
    │   ├── InvalidExpiryYear                                   402  invalid_expiry_year
    │   ├── ExpiredCard                                         402  expired_card
    │   └── InvalidCVC                                          402  invalid_cvc
    ├── IdempotencyError                 idempotency_error      400  idempotency_key_reused
    │   └── IdempotencyKeyInUse                                 409  idempotency_key_in_use
    ├── AuthenticationError              authentication_error   401  api_key_invalid
    │   └── ClientCertificateRequired                           401  client_certificate_required
    ├── PermissionDenied                 permission_error       403  permission_denied
    │   └── IdentityNotAllowed                                  403  identity_not_allowed
    └── RateLimitError                   rate_limit_error       429  rate_limit

Lower layers raise their own exceptions; the boundary translates them into a leaf with
``raise Leaf(...) from exc`` so the cause is kept for the logs but not shown to callers.
The storage layer is the one exception that is already a leaf when it is raised:
:class:`cardvault.storage.StoreUnavailable` is a :class:`DatabaseUnavailable` (and a
:class:`StorageFull` when the disk is full), so a database outage met anywhere in a
request is a 503 and never the 500 of a bug.

Every 503 says when to come back: :attr:`CardVaultError.retry_after` is the class's
``Retry-After`` (seconds), set on every instance unless the raise site gives its own
(docs/reliability.md lists them, and why each value). ``RateLimitError``'s raise site
always computes its own. A 500 (:class:`APIError` itself) has none: it means a bug, not
"try again later".
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "APIError",
    "AuditUnavailableError",
    "AuthenticationError",
    "CardError",
    "CardVaultError",
    "CiphertextInvalid",
    "ClientCertificateRequired",
    "ConfigurationError",
    "DatabaseUnavailable",
    "ExpiredCard",
    "ExportRefused",
    "ForwardingDestinationError",
    "IdempotencyError",
    "IdempotencyKeyInUse",
    "IdentityNotAllowed",
    "ImportRefused",
    "IncorrectNumber",
    "InvalidCVC",
    "InvalidExpiryMonth",
    "InvalidExpiryYear",
    "InvalidNumber",
    "InvalidRequestError",
    "KeyServiceSealed",
    "KeyServiceUnavailable",
    "KeyVersionUnavailable",
    "MalformedRequest",
    "MethodNotAllowed",
    "ParameterMissing",
    "ParameterUnknown",
    "PermissionDenied",
    "RateLimitError",
    "RequestHeaderFieldsTooLarge",
    "RequestTimeout",
    "RequestTooLarge",
    "ResourceMissing",
    "ServiceUnavailable",
    "StorageFull",
    "TooManyConnections",
    "UnsealShareInvalid",
    "UnsupportedMediaType",
    "UriTooLong",
    "UrlNotFound",
    "error_class_for",
]


class CardVaultError(Exception):
    """Base of every cardvault error.

    ``message`` is shown to the caller and must never contain caller input.
    ``param`` names the offending parameter (``card[number]``), never its value.
    ``headers`` go out with the answer; a class with a :attr:`retry_after` puts its
    ``Retry-After`` there unless the raise site gave one.
    """

    type: ClassVar[str] = "api_error"
    code: ClassVar[str] = "api_error"
    http_status: ClassVar[int] = 500
    default_message: ClassVar[str] = "An internal error occurred."
    #: Seconds for the answer's ``Retry-After``: set on every "try again later" (each
    #: 503, and 429), so that no raise site can forget it; None for the rest.
    retry_after: ClassVar[int | None] = None

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message if message is not None else self.default_message
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})
        if self.retry_after is not None and not any(
            name.lower() == "retry-after" for name in self.headers
        ):
            self.headers["Retry-After"] = str(self.retry_after)
        super().__init__(self.message)

    def to_dict(self, request_log_url: str | None = None) -> dict[str, Any]:
        """Stripe's error object: ``{"error": {...}}``."""
        body: dict[str, Any] = {
            "type": self.type,
            "code": self.code,
            "message": self.message,
        }
        if self.param is not None:
            body["param"] = self.param
        if request_log_url is not None:
            body["request_log_url"] = request_log_url
        return {"error": body}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, param={self.param!r})"


# --- api_error ---------------------------------------------------------------------


class APIError(CardVaultError):
    """Something went wrong on our side. The message never says what."""


class ServiceUnavailable(APIError):
    """Try again later: the request was refused because something it needs is missing
    for now. Every subclass is a 503 with its own code and ``Retry-After``."""

    code = "service_unavailable"
    http_status = 503
    retry_after = 5
    default_message = "The service is temporarily unavailable. Retry later."


class KeyServiceUnavailable(ServiceUnavailable):
    """The key service cannot be reached or did not answer as it should. Restarted by
    its supervisor it answers again within a couple of seconds."""

    code = "keyservice_unavailable"
    retry_after = 2
    default_message = "The key service cannot be reached. Nothing was stored; retry later."


class AuditUnavailableError(ServiceUnavailable):
    """The audit record of a sensitive operation could not be written: refused (fail closed)."""

    code = "audit_unavailable"
    retry_after = 5
    default_message = "The audit log cannot be written, so the operation was refused. Retry later."


class KeyServiceSealed(ServiceUnavailable):
    """The key service holds no keys until custodians unseal it: by hand, in minutes."""

    code = "keyservice_sealed"
    retry_after = 30
    default_message = (
        "The key service is sealed. Custodians must unseal it before keys can be used."
    )


class DatabaseUnavailable(ServiceUnavailable):
    """The service's database cannot be reached or cannot take a write now (a lost or
    refused connection, a server shutting down or out of connections, an I/O error, a
    lock held past its timeout). Raised by the storage layer as
    :class:`cardvault.storage.StoreUnavailable`. Whether a write that was in flight took
    effect is unknown."""

    code = "database_unavailable"
    retry_after = 2
    default_message = "The database is temporarily unavailable. Retry later."


class StorageFull(DatabaseUnavailable):
    """The database's disk (or its size limit) is full: nothing more can be written until
    space is freed, which takes an operator or a purge, not a moment."""

    code = "storage_full"
    retry_after = 30
    default_message = "The service's storage is full, so nothing can be saved now. Retry later."


class TooManyConnections(ServiceUnavailable):
    """A listener's connection cap, or its cap per client address, is reached. Answered
    by the transport with ``Retry-After`` on a connection it then closes."""

    code = "too_many_connections"
    retry_after = 1
    default_message = "The server has too many open connections. Retry after the Retry-After delay."


class ForwardingDestinationError(APIError):
    """A forward's destination could not be reached or broke a limit (details in the log)."""

    code = "forwarding_destination_error"
    http_status = 502
    #: The request may have left the vault: a retry with the same Idempotency-Key must
    #: not send it again.
    consumes_idempotency_key: ClassVar[bool] = True
    default_message = (
        "The forwarding destination could not be reached, did not answer in time, failed "
        "certificate verification, or sent too large a response."
    )


class ConfigurationError(APIError):
    """A setting is missing or invalid. Raised at start-up, with a message naming it.

    The message names settings, never their values, because values may be secrets.
    """

    code = "configuration_error"


# --- invalid_request_error -----------------------------------------------------------


class InvalidRequestError(CardVaultError):
    type = "invalid_request_error"
    code = "parameter_invalid"
    http_status = 400
    default_message = "The request is invalid."


class ParameterMissing(InvalidRequestError):
    code = "parameter_missing"
    default_message = "A required parameter is missing."


class ParameterUnknown(InvalidRequestError):
    code = "parameter_unknown"
    default_message = "The request contains a parameter that is not recognized."


class ResourceMissing(InvalidRequestError):
    code = "resource_missing"
    http_status = 404
    default_message = "No such object."


class ImportRefused(InvalidRequestError):
    """A bulk import's file refused whole, nothing of it imported; ``reason`` says why
    (``corrupt``, ``wrong_key``, ``line_too_long``, ``duplicate_external_id`` …,
    docs/migration.md) and goes out in the error object beside the code."""

    code = "import_refused"
    default_message = "The file was refused whole; nothing of it was imported."

    def __init__(
        self, reason: str = "refused", message: str | None = None, *, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.reason = reason

    def to_dict(self, request_log_url: str | None = None) -> dict[str, Any]:
        body = super().to_dict(request_log_url)
        body["error"]["reason"] = self.reason
        return body


class ExportRefused(InvalidRequestError):
    """A card export refused: ``reason`` says why (``recipient_not_allowed``,
    ``fingerprint_mismatch``, ``key_refused``, ``not_approved``,
    ``approval_share_invalid`` …, docs/migration.md) and goes out beside the code."""

    code = "export_refused"
    http_status = 403
    default_message = "The export was refused."

    def __init__(self, reason: str = "refused", message: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason

    def to_dict(self, request_log_url: str | None = None) -> dict[str, Any]:
        body = super().to_dict(request_log_url)
        body["error"]["reason"] = self.reason
        return body


class UrlNotFound(InvalidRequestError):
    code = "url_invalid"
    http_status = 404
    default_message = "Unrecognized request URL."


class CiphertextInvalid(InvalidRequestError):
    code = "ciphertext_invalid"
    default_message = (
        "The ciphertext or wrapped key could not be opened: it is malformed, altered, "
        "for another key or purpose, or its key version is retired."
    )


class KeyVersionUnavailable(CiphertextInvalid):
    """Data under a key version that was retired or destroyed (crypto-shredded): it can
    no longer be decrypted, and retrying will not help."""

    code = "key_version_unavailable"
    http_status = 410
    default_message = (
        "The card data was encrypted under a key version that has been retired or "
        "destroyed; it can no longer be decrypted. Collect the card again."
    )


class UnsealShareInvalid(InvalidRequestError):
    code = "unseal_share_invalid"
    default_message = "The unseal share is invalid. All unseal progress has been discarded."


class MethodNotAllowed(InvalidRequestError):
    code = "method_not_allowed"
    http_status = 405
    default_message = "This method is not allowed on this URL."


class MalformedRequest(InvalidRequestError):
    """The bytes received are not an HTTP/1.1 request (answered by the transport)."""

    code = "request_malformed"
    default_message = "The request is not a valid HTTP/1.1 request."


class RequestTimeout(InvalidRequestError):
    """The request's head or body did not arrive in time (answered by the transport)."""

    code = "request_timeout"
    http_status = 408
    default_message = "The request was not received in time."


class UriTooLong(InvalidRequestError):
    """The request target is longer than the listener accepts (answered by the transport)."""

    code = "uri_too_long"
    http_status = 414
    default_message = "The request URL is too long."


class RequestHeaderFieldsTooLarge(InvalidRequestError):
    """The request's head is too large or has too many fields (answered by the transport)."""

    code = "request_header_fields_too_large"
    http_status = 431
    default_message = "The request's header fields are too large or too many."


class RequestTooLarge(InvalidRequestError):
    code = "request_too_large"
    http_status = 413
    default_message = "The request body is too large."


class UnsupportedMediaType(InvalidRequestError):
    code = "unsupported_media_type"
    http_status = 415
    default_message = "Send the body as application/x-www-form-urlencoded or application/json."


# --- card_error ----------------------------------------------------------------------


class CardError(CardVaultError):
    type = "card_error"
    code = "card_declined"
    http_status = 402
    default_message = "The card was declined."


class IncorrectNumber(CardError):
    code = "incorrect_number"
    default_message = "Your card number is incorrect."


class InvalidNumber(CardError):
    code = "invalid_number"
    default_message = "Your card number is not a valid card number."


class InvalidExpiryMonth(CardError):
    code = "invalid_expiry_month"
    default_message = "Your card's expiration month is invalid."


class InvalidExpiryYear(CardError):
    code = "invalid_expiry_year"
    default_message = "Your card's expiration year is invalid."


class ExpiredCard(CardError):
    code = "expired_card"
    default_message = "Your card has expired."


class InvalidCVC(CardError):
    code = "invalid_cvc"
    default_message = "Your card's security code is invalid."


# --- idempotency_error ---------------------------------------------------------------


class IdempotencyError(CardVaultError):
    type = "idempotency_error"
    code = "idempotency_key_reused"
    http_status = 400
    default_message = (
        "Keys for idempotent requests can only be used with the same parameters they "
        "were first used with."
    )


class IdempotencyKeyInUse(IdempotencyError):
    code = "idempotency_key_in_use"
    http_status = 409
    default_message = "A request with this idempotency key is still being processed. Retry later."


# --- authentication_error ------------------------------------------------------------


class AuthenticationError(CardVaultError):
    type = "authentication_error"
    code = "api_key_invalid"
    http_status = 401
    default_message = "Invalid API key provided."


class ClientCertificateRequired(AuthenticationError):
    code = "client_certificate_required"
    default_message = "This endpoint requires a client certificate."


# --- permission_error ----------------------------------------------------------------


class PermissionDenied(CardVaultError):
    type = "permission_error"
    code = "permission_denied"
    http_status = 403
    default_message = "The credentials used do not have permission for this request."


class IdentityNotAllowed(PermissionDenied):
    code = "identity_not_allowed"
    default_message = "The client certificate's identity may not use this endpoint."


# --- rate_limit_error ----------------------------------------------------------------


class RateLimitError(CardVaultError):
    """A key's token bucket is empty. The raise site sets ``Retry-After`` to when the
    next token comes; the class's 1 s is only the net under it."""

    type = "rate_limit_error"
    code = "rate_limit"
    http_status = 429
    retry_after = 1
    default_message = "Too many requests. Slow down and retry after the Retry-After delay."


def _leaves(cls: type[CardVaultError]) -> list[type[CardVaultError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_leaves(sub))
    return out


_BY_CODE: dict[str, type[CardVaultError]] = {c.code: c for c in _leaves(CardVaultError)}


def error_class_for(code: str | None, error_type: str | None = None) -> type[CardVaultError]:
    """The class for a stable ``code`` (used by the SDK to rebuild typed errors).

    Unknown codes fall back to the class of the Stripe ``type``, then to ``APIError``.
    """
    if code and code in _BY_CODE:
        return _BY_CODE[code]
    for cls in (
        InvalidRequestError,
        CardError,
        IdempotencyError,
        AuthenticationError,
        PermissionDenied,
        RateLimitError,
    ):
        if cls.type == error_type:
            return cls
    return APIError
