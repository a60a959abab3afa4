"""docs/openapi.json describes the vault's public API as the code serves it.

The route table is the one the vault's public listener serves: ``build_listeners`` (what
``cardvault vault serve`` runs) builds the app from real settings, with stand-ins for the
vault's services, whose routes only close over them. So a route added to the
code anywhere (the payment API, forwarding, the card element, security.txt) without a
line in the document fails here, and so does a documented route that no longer exists.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from starlette.routing import Route

from cardvault.cards import find_card_numbers, luhn_valid
from cardvault.config import load_settings
from cardvault.errors import (
    CardVaultError,
    MalformedRequest,
    RequestHeaderFieldsTooLarge,
    RequestTimeout,
    RequestTooLarge,
    TooManyConnections,
    UriTooLong,
)
from cardvault.transport.asgi import SecurityHeaders
from cardvault.vault.app import Vault, build_listeners
from cardvault.vault.http import PublicAPI
from cardvault.vault.http import routes as vault_routes
from cardvault.vault.ratelimit import KeyLimits, RateLimiter
from cardvault.vault.settings import VaultSettings
from helpers import self_signed

DOCS = Path(__file__).resolve().parents[2] / "docs"
OPENAPI = DOCS / "openapi.json"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PUBLISHED_TEST_CARD = "4242424242424242"
# How the document lists the codes an error response may carry, in its description.
CODES_LINE = re.compile(r"Error codes: (.+)\.\s*$")
CODE = re.compile(r"`([a-z_]+)`")

Operation = tuple[str, str]  # (path with its parameters blanked, METHOD)


def load_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(OPENAPI.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return load_doc()


def _template(path: str) -> str:
    # Starlette writes "{pm}" where the document writes "{id}": only the shape matters.
    return re.sub(r"\{[^{}]*\}", "{}", path)


class _StandIn:
    """In place of the services: building the routes never calls them."""

    def __getattr__(self, name: str) -> _StandIn:
        # The vault's objects (vault.accounts, vault.forwarder …) are stand-ins too.
        return _StandIn()


def served_routes(directory: Path) -> tuple[set[Operation], set[Operation]]:
    """(every operation the public listener serves, those that need an API key).

    The public listener is built by ``build_listeners`` from settings, as the vault
    process builds it; ``directory`` holds the certificate its TLS context loads.
    """
    cert, key = self_signed(directory)
    settings = load_settings(
        VaultSettings,
        env={},
        overrides={"server": {"cert_file": str(cert), "key_file": str(key)}},
    )
    vault = cast(Vault, _StandIn())
    public = [lst for lst in build_listeners(settings, vault) if lst.name == "public"]
    assert len(public) == 1
    app = public[0].app
    assert isinstance(app, SecurityHeaders)
    limits = KeyLimits(RateLimiter(1.0, 1.0), RateLimiter(1.0, 1.0))
    api = PublicAPI(
        accounts=vault.accounts,
        payment_methods=vault.payment_methods,
        idempotency=vault.idempotency,
        payment_method_limits=limits,
        forwarder=vault.forwarder,
        forwarding_limits=limits,
        events=vault.events,
        webhooks=vault.webhooks,
    )
    with_key = vault_routes(api).with_api_key

    def operations(routes: list[Any]) -> set[Operation]:
        out: set[Operation] = set()
        for route in routes:
            assert isinstance(route, Route), f"not a plain route: {route!r}"
            assert route.methods
            # Starlette answers HEAD wherever it answers GET; the document says so once
            # instead of listing a HEAD operation beside every GET.
            out |= {(_template(route.path), m) for m in route.methods if m != "HEAD"}
        return out

    return operations(app.app.routes), operations(with_key)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> tuple[set[Operation], set[Operation]]:
    return served_routes(tmp_path_factory.mktemp("openapi"))


def documented_operations(doc: dict[str, Any]) -> set[Operation]:
    return {
        (_template(path), method.upper())
        for path, item in doc["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def operations_of(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                yield path, method, op


def resolve(doc: dict[str, Any], pointer: str) -> Any:
    """The target of a local ``$ref`` (a JSON pointer, RFC 6901); KeyError if none."""
    if not pointer.startswith("#/"):
        raise KeyError(f"not a local reference: {pointer}")
    node: Any = doc
    for raw in pointer[2:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(pointer)
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def unresolved_refs(doc: dict[str, Any]) -> list[str]:
    missing = []
    for pointer in refs(doc):
        try:
            resolve(doc, pointer)
        except (KeyError, IndexError, ValueError):
            missing.append(pointer)
    return missing


def deref(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = resolve(doc, node["$ref"])
    return node


def error_responses(doc: dict[str, Any]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(where, status, response) for every 4xx/5xx JSON response of every operation."""
    for path, method, op in operations_of(doc):
        for status, response in op["responses"].items():
            response = deref(doc, response)
            if int(status) >= 400 and "application/json" in response.get("content", {}):
                yield f"{method.upper()} {path} {status}", int(status), response


def non_json_errors(doc: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (path, method, status)
        for path, method, op in operations_of(doc)
        for status, response in op["responses"].items()
        if int(status) >= 400
        and set(deref(doc, response).get("content", {})) != {"application/json"}
    }


def codes_in(description: str) -> set[str] | None:
    """The codes of the description's "Error codes: `a`, `b`." line, or None without one."""
    for line in description.splitlines():
        match = CODES_LINE.search(line)
        if match:
            return set(CODE.findall(match.group(1)))
    return None


def transport_codes() -> dict[str, int]:
    """The codes the listener's transport answers before any route, with their status."""
    return {
        cls.code: cls.http_status
        for cls in (
            MalformedRequest,
            RequestTimeout,
            RequestTooLarge,
            UriTooLong,
            RequestHeaderFieldsTooLarge,
            TooManyConnections,
        )
    }


def error_classes() -> dict[str, type[CardVaultError]]:
    out: dict[str, type[CardVaultError]] = {}
    todo = [CardVaultError]
    while todo:
        cls = todo.pop()
        out[cls.code] = cls
        todo.extend(cls.__subclasses__())
    return out


def unknown_codes(doc: dict[str, Any]) -> list[str]:
    known = error_classes()
    found = [
        (where, code)
        for where, _, response in error_responses(doc)
        for code in codes_in(response["description"]) or ()
    ]
    schema = doc["components"]["schemas"]["Error"]["properties"]["code"]
    found += [("Error.code enum", code) for code in schema["enum"]]
    return [f"{where}: {code}" for where, code in found if code not in known]


# --- the document as a whole -----------------------------------------------------------


def test_document_is_openapi_3_1_with_the_local_stack_as_server(doc: dict[str, Any]) -> None:
    assert re.fullmatch(r"3\.1\.\d+", doc["openapi"])
    assert doc["info"]["title"] and doc["info"]["version"]
    assert "https://localhost:8443" in [s["url"] for s in doc["servers"]]


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    assert list(refs(doc)), "the document uses no $ref at all"
    assert unresolved_refs(doc) == []


def test_the_ref_check_notices_a_dangling_reference(doc: dict[str, Any]) -> None:
    broken = copy.deepcopy(doc)
    del broken["components"]["schemas"]["PaymentMethod"]
    assert "#/components/schemas/PaymentMethod" in unresolved_refs(broken)


def test_required_components_exist(doc: dict[str, Any]) -> None:
    components = doc["components"]
    assert {"PaymentMethod", "PaymentMethodList", "DeletedPaymentMethod", "Error"} <= set(
        components["schemas"]
    )
    schemes = components["securitySchemes"]
    assert (schemes["bearerAuth"]["type"], schemes["bearerAuth"]["scheme"]) == ("http", "bearer")
    assert (schemes["basicAuth"]["type"], schemes["basicAuth"]["scheme"]) == ("http", "basic")
    key = components["parameters"]["Idempotency-Key"]
    assert (key["in"], key["name"]) == ("header", "Idempotency-Key")


# --- routes ------------------------------------------------------------------------------


def test_every_served_route_is_documented_and_nothing_else(
    doc: dict[str, Any], routes: tuple[set[Operation], set[Operation]]
) -> None:
    served, _ = routes
    documented = documented_operations(doc)
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"


def test_the_route_table_is_the_whole_public_api(
    routes: tuple[set[Operation], set[Operation]],
) -> None:
    # The route table above really is the listener's: the payment API, forwarding, the
    # card element and security.txt are all in it (a stand-in mistake would shrink it
    # and let the comparison pass on too little).
    served, with_key = routes
    assert {
        ("/v1/payment_methods", "POST"),
        ("/v1/payment_methods/{}", "DELETE"),
        ("/v1/forwarding/requests", "POST"),
        ("/v1/forwarding/requests", "GET"),
        ("/v1/forwarding/requests/{}", "GET"),
        ("/v1/events", "GET"),
        ("/v1/webhook_endpoints", "POST"),
        ("/v1/webhook_endpoints/{}/deliveries", "GET"),
        ("/js/v1/cardvault.js", "GET"),
        ("/js/v1/cardvault.js.sri", "GET"),
        ("/element/v1/card.html", "GET"),
        ("/element/v1/card.js", "GET"),
        ("/element/v1/card.css", "GET"),
        ("/.well-known/security.txt", "GET"),
        ("/security.txt", "GET"),
        ("/openapi.json", "GET"),
        ("/healthz", "GET"),
    } <= served
    assert with_key <= served
    assert len(with_key) == 14


def test_the_route_check_notices_an_undocumented_route(
    doc: dict[str, Any], routes: tuple[set[Operation], set[Operation]]
) -> None:
    served, _ = routes
    for path, method, template in [
        ("/v1/payment_methods/{id}", "delete", "/v1/payment_methods/{}"),
        ("/v1/forwarding/requests/{id}", "get", "/v1/forwarding/requests/{}"),
        ("/element/v1/card.html", "get", "/element/v1/card.html"),
    ]:
        trimmed = copy.deepcopy(doc)
        del trimmed["paths"][path][method]
        assert served - documented_operations(trimmed) == {(template, method.upper())}


def test_the_route_check_notices_an_operation_that_is_not_served(
    doc: dict[str, Any], routes: tuple[set[Operation], set[Operation]]
) -> None:
    served, _ = routes
    extra = copy.deepcopy(doc)
    extra["paths"]["/v1/forwarding/requests/{id}"]["delete"] = {"responses": {}}
    assert documented_operations(extra) - served == {("/v1/forwarding/requests/{}", "DELETE")}


def test_api_operations_require_a_key_and_the_others_do_not(
    doc: dict[str, Any], routes: tuple[set[Operation], set[Operation]]
) -> None:
    _, with_key = routes
    schemes = set(doc["components"]["securitySchemes"])
    for path, method, op in operations_of(doc):
        security = op.get("security", doc.get("security", []))
        if (_template(path), method.upper()) in with_key:
            assert security, f"{method} {path} documented without authentication"
            assert {name for req in security for name in req} == {"bearerAuth", "basicAuth"}
        else:
            assert security == [], f"{method} {path} needs no API key but says it does"
        assert {name for req in security for name in req} <= schemes


def test_operation_ids_are_unique_and_links_name_real_operations(doc: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in operations_of(doc)]
    assert len(ids) == len(set(ids))
    by_id = {op["operationId"]: (path, op) for path, _, op in operations_of(doc)}
    links = [
        link
        for _, _, op in operations_of(doc)
        for response in op["responses"].values()
        for link in deref(doc, response).get("links", {}).values()
    ]
    assert links, "no links: a stateful tester cannot chain a create to its reads"
    for link in links:
        path, target = by_id[link["operationId"]]
        names = {
            deref(doc, p)["name"]
            for p in [*doc["paths"][path].get("parameters", []), *target.get("parameters", [])]
        }
        assert set(link.get("parameters", {})) <= names, link


# --- responses and errors ----------------------------------------------------------------


def test_every_response_carries_request_id_and_hsts(doc: dict[str, Any]) -> None:
    for path, method, op in operations_of(doc):
        for status, response in op["responses"].items():
            headers = deref(doc, response).get("headers", {})
            where = f"{method.upper()} {path} {status}"
            assert {"Request-Id", "Strict-Transport-Security"} <= set(headers), where
            if status == "429":
                assert "Retry-After" in headers, where
            if status == "405":
                assert "Allow" in headers, where


def test_every_error_response_lists_its_codes_with_the_matching_status(
    doc: dict[str, Any],
) -> None:
    known = error_classes()
    responses = list(error_responses(doc))
    assert {status for _, status, _ in responses} >= {
        400,
        401,
        402,
        403,
        404,
        405,
        409,
        413,
        415,
        429,
        500,
        503,
    }
    for where, status, response in responses:
        codes = codes_in(response["description"])
        assert codes, f"{where}: no 'Error codes:' line"
        schema = deref(doc, response["content"]["application/json"]["schema"])
        assert schema == doc["components"]["schemas"]["ErrorResponse"], where
        for code in codes:
            assert code in known, f"{where}: {code} is not a code in cardvault.errors"
            assert known[code].http_status == status, f"{where}: {code} is not a {status}"


def test_the_card_frame_refusal_is_the_only_error_that_is_not_an_error_object(
    doc: dict[str, Any],
) -> None:
    # A browser shows the refusal inside the merchant's page, so it is a page.
    assert non_json_errors(doc) == {("/element/v1/card.html", "get", "403")}
    refused = deref(doc, doc["paths"]["/element/v1/card.html"]["get"]["responses"]["403"])
    assert set(refused["content"]) == {"text/html"}


def test_every_operation_documents_the_statuses_its_layers_can_answer(
    doc: dict[str, Any], routes: tuple[set[Operation], set[Operation]]
) -> None:
    """The statuses that come from the layers every request crosses, not from the
    endpoint: the transport's refusals (a request it cannot parse, too slow, too large,
    too long a URL, too large a head, too many connections); any path answers 405 for
    another method and 500 for a crash; a key means
    401, 429 and 503 (a failed authentication is audited, and the audit log fails
    closed); a body means 400, 413 and 415; a secret-key-only operation is 403 for a
    publishable key."""
    _, with_key = routes
    transport = transport_codes()
    for path, method, op in operations_of(doc):
        statuses = set(op["responses"])
        where = f"{method.upper()} {path}"
        assert {"405", "500"} <= statuses, where
        # The transport's refusals come before any route, so every operation has them.
        for code, status in transport.items():
            response = deref(doc, op["responses"].get(str(status), {"description": ""}))
            assert code in (codes_in(response["description"]) or ()), f"{where}: {code}"
        if (_template(path), method.upper()) in with_key:
            assert {"401", "429", "503"} <= statuses, where
            if op["operationId"] != "createPaymentMethod":
                assert "403" in statuses, where
        if "requestBody" in op:
            assert {"400", "413", "415"} <= statuses, where
            assert set(op["requestBody"]["content"]) == {
                "application/x-www-form-urlencoded",
                "application/json",
            }, where
        if any(deref(doc, p)["name"] == "Idempotency-Key" for p in op.get("parameters", [])):
            assert {"400", "409"} <= statuses, where


def test_every_error_code_in_the_document_exists_in_cardvault_errors(
    doc: dict[str, Any],
) -> None:
    assert unknown_codes(doc) == []


def test_the_code_check_notices_an_invented_code(doc: dict[str, Any]) -> None:
    changed = copy.deepcopy(doc)
    changed["components"]["schemas"]["Error"]["properties"]["code"]["enum"].append("card_stolen")
    assert unknown_codes(changed) == ["Error.code enum: card_stolen"]


def test_error_code_enum_is_exactly_the_codes_the_responses_list(doc: dict[str, Any]) -> None:
    listed = {c for _, _, r in error_responses(doc) for c in codes_in(r["description"]) or ()}
    enum = doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    assert len(enum) == len(set(enum))
    # A URL that no route serves has no operation to list its code under; the document
    # says it in its introduction instead.
    assert "`url_invalid`" in doc["info"]["description"]
    assert set(enum) == listed | {"url_invalid"}


def test_error_types_are_the_seven_stripe_types_of_the_error_tree(doc: dict[str, Any]) -> None:
    error = doc["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"type", "code", "message", "param", "request_log_url"}
    assert set(error["properties"]["type"]["enum"]) == {
        cls.type for cls in error_classes().values()
    }
    assert len(error["properties"]["type"]["enum"]) == 7


# --- examples ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["openapi.json", "api.md"])
def test_examples_use_only_the_published_test_card(name: str) -> None:
    text = (DOCS / name).read_text(encoding="utf-8")
    numbers = {re.sub(r"\D", "", m.group()) for m in find_card_numbers(text)}
    assert numbers <= {PUBLISHED_TEST_CARD}


def published_test_cards() -> list[str]:
    table = json.loads(
        (Path(__file__).resolve().parents[2] / "src/cardvault/cards/test_cards.json").read_text()
    )
    return [str(card["number"]) for card in table["cards"]]


def test_the_schema_says_what_a_card_number_looks_like(doc: dict[str, Any]) -> None:
    """A schema-driven tester generates card numbers from this pattern: 13 to 19 digits
    with the vault's separators, so some of what it sends passes the Luhn check."""
    schemas = doc["components"]["schemas"]
    form = schemas["PaymentMethodCreateForm"]["properties"]["card[number]"]
    as_json = schemas["PaymentMethodCreateParams"]["properties"]["card"]["properties"]["number"]
    assert form["pattern"] == as_json["pattern"]
    pattern = re.compile(form["pattern"])
    cards = published_test_cards()
    assert len(cards) > 10
    accepted = [*cards, "4242 4242 4242 4242", "4242-4242-4242-4242", " 4242424242424242 "]
    assert [n for n in accepted if not pattern.search(n)] == []
    refused = [
        "",
        "0242424242424242",  # a leading 0 is no network's
        "424242424242",  # 12 digits
        "42424242424242424242",  # 20 digits
        "4242  4242 4242 4242",  # two separators in a row
        "4242 4242 4242 4242-",
        "4242424242424242x",
        "\u0664\u0662\u0664\u0662\u0664\u0662\u0664\u0662\u0664\u0662\u0664\u0662\u0664",
    ]
    assert [n for n in refused if pattern.search(n)] == []
    assert (as_json["minimum"], as_json["maximum"]) == (10**12, 10**19 - 1)
    assert all(luhn_valid(n) for n in cards)
