"""What an outside tester broke with single requests (issue 17), against a real vault and
key service over real TLS. Each test names the defect it keeps fixed."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from hostile_support import OPEN_LIMITS, card_forms, card_numbers_in, leaks_in_stack, vault_rss_mib

from helpers import Pki
from stack import Stack, run_stack, vault_database

VISA = "4242424242424242"
CARD = {
    "type": "card",
    "card[number]": VISA,
    "card[exp_month]": "12",
    "card[exp_year]": "2034",
}


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **headers}


def assert_stripe_error(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"type", "code", "message"}
    assert card_numbers_in(response.text) == []
    return error


# -- 1. amplification with the public key -------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "foo[100000000]=x",
        "card[5105105105105100]=1",
        "foo[3000000]=x&bar[3000000]=x&baz[3000000]=x",
    ],
)
def test_a_list_index_in_a_form_key_is_refused_without_allocating(
    hostile: Stack, client: httpx.Client, body: str
) -> None:
    before = vault_rss_mib(hostile.vault_pid)
    response = client.post(
        f"{hostile.url}/v1/payment_methods",
        content=body,
        headers=auth(
            hostile.accounts[1]["pk"], **{"content-type": "application/x-www-form-urlencoded"}
        ),
    )
    error = assert_stripe_error(response, 400)
    assert error["type"] == "invalid_request_error"
    # Before: 151 → 935 MB for the first body, and the OOM killer for the second.
    assert vault_rss_mib(hostile.vault_pid) < before + 50


@pytest.mark.parametrize("path", ["/v1/payment_methods", "/v1/forwarding/requests"])
def test_a_list_index_in_a_query_is_refused(
    hostile: Stack, client: httpx.Client, path: str
) -> None:
    response = client.get(
        f"{hostile.url}{path}?foo[50000000]=x", headers=auth(hostile.accounts[1]["sk"])
    )
    assert_stripe_error(response, 400)
    assert vault_rss_mib(hostile.vault_pid) < 200


def test_a_flood_of_amplification_requests_leaves_memory_flat_and_tokenization_working(
    hostile: Stack, client: httpx.Client
) -> None:
    # Bounded: 400 hostile requests from 8 threads, while the main thread tokenizes.
    pk = hostile.accounts[1]["pk"]
    hostile_bodies = ["foo[100000000]=x", "card[5105105105105100]=1"] * 200
    peak = [vault_rss_mib(hostile.vault_pid)]
    statuses: list[int] = []
    done = threading.Event()

    def attack(body: str) -> int:
        r = client.post(
            f"{hostile.url}/v1/payment_methods",
            content=body,
            headers=auth(pk, **{"content-type": "application/x-www-form-urlencoded"}),
        )
        peak.append(vault_rss_mib(hostile.vault_pid))
        return r.status_code

    def watch() -> None:
        while not done.is_set():
            peak.append(vault_rss_mib(hostile.vault_pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    good: list[tuple[int, float]] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(attack, b) for b in hostile_bodies]
            while not all(f.done() for f in futures):
                started = time.perf_counter()
                r = client.post(f"{hostile.url}/v1/payment_methods", data=CARD, headers=auth(pk))
                good.append((r.status_code, time.perf_counter() - started))
            statuses = [f.result() for f in futures]
    finally:
        done.set()
        watcher.join()
    assert set(statuses) == {400}
    assert good and {status for status, _ in good} == {200}
    assert max(peak) < 200, f"vault RSS peaked at {max(peak):.0f} MiB"
    # The latency is reported, not asserted (bench/hostile.py measures it).
    print(f"tokenizations under the flood: {len(good)}, slowest {max(t for _, t in good):.3f} s")


# -- 2. one tenant's bad byte fails only its own request ------------------------------------


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def isolated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[Stack]:
    with vault_database(request.param, tmp_path_factory.mktemp("iso-db")) as dsn:
        yield from run_stack(tmp_path_factory, pki, request.param, dsn, limits=OPEN_LIMITS)


@pytest.mark.parametrize(
    "poison",
    [
        '{"type":"card","card":{"number":"4242424242424242","exp_month":12,"exp_year":2034},'
        '"metadata":{"k":"\\ud800"}}',
        '{"type":"card","card":{"number":"4242424242424242","exp_month":12,"exp_year":2034},'
        '"billing_details":{"email":"\\udfff"}}',
    ],
    ids=["metadata", "billing_details"],
)
def test_a_lone_surrogate_fails_only_its_own_request_with_400(
    isolated: Stack, client: httpx.Client, poison: str
) -> None:
    # Before: with one account sending this, another account's tokenizations got 500
    # (109 of 120 at 32 concurrent), and the bad request itself got 500.
    bad_key, good_key = isolated.accounts[0]["sk"], isolated.accounts[1]["sk"]

    def bad() -> int:
        return client.post(
            f"{isolated.url}/v1/payment_methods",
            content=poison.encode(),
            headers=auth(bad_key, **{"content-type": "application/json"}),
        ).status_code

    def good() -> int:
        return client.post(
            f"{isolated.url}/v1/payment_methods", data=CARD, headers=auth(good_key)
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        jobs = [pool.submit(bad if n % 4 == 0 else good) for n in range(128)]
        results = [(n % 4 == 0, job.result()) for n, job in enumerate(jobs)]
    assert {status for is_bad, status in results if is_bad} == {400}
    assert {status for is_bad, status in results if not is_bad} == {200}


# -- 4. a card number at rest through Idempotency-Key ---------------------------------------


def test_an_idempotency_key_holding_a_card_number_is_not_stored_in_the_clear(
    hostile: Stack, client: httpx.Client
) -> None:
    sk = hostile.accounts[1]["sk"]
    keys = ["5200828282828210", "5200 8282 8282 8210", "5200.8282.8282.8210"]
    for key in keys:
        first = client.post(
            f"{hostile.url}/v1/payment_methods",
            data=CARD,
            headers=auth(sk, **{"idempotency-key": key}),
        )
        again = client.post(
            f"{hostile.url}/v1/payment_methods",
            data=CARD,
            headers=auth(sk, **{"idempotency-key": key}),
        )
        assert first.status_code == again.status_code == 200
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
    stored = [k for (k,) in hostile.sql("SELECT idempotency_key FROM idempotency_keys")]
    assert stored and all(str(k).startswith("ik_") for k in stored)
    assert leaks_in_stack(hostile) == []


# -- 5. 500s where a 400 belongs --------------------------------------------------------------


def test_json_nested_thirty_thousand_deep_is_400(hostile: Stack, client: httpx.Client) -> None:
    for body in (b"[" * 30_000, b'{"a":' * 12_000, b'{"metadata":' + b"[" * 30_000):
        response = client.post(
            f"{hostile.url}/v1/payment_methods",
            content=body,
            headers=auth(hostile.accounts[1]["sk"], **{"content-type": "application/json"}),
        )
        assert_stripe_error(response, 400)


@pytest.mark.parametrize("path", ["/v1/payment_methods", "/v1/forwarding/requests"])
@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("starting_after=&ending_before=", 200),
        ("starting_after[a]=b", 400),
        ("starting_after[]=x", 400),
        ("ending_before[0][x]=1", 400),
        ("limit[]=3", 400),
        ("limit=%D9%A3", 400),
    ],
)
def test_list_parameters_of_the_wrong_shape_are_400_never_500(
    hostile: Stack, client: httpx.Client, path: str, query: str, status: int
) -> None:
    response = client.get(f"{hostile.url}{path}?{query}", headers=auth(hostile.accounts[1]["sk"]))
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        assert_stripe_error(response, status)


# -- 6. the log scrubber sees every form of a card number ---------------------------------------


@pytest.mark.parametrize("form", ["plain", "dots", "fullwidth", "arabic-indic", "mixed", "dashes"])
def test_a_card_number_in_a_url_path_never_reaches_the_access_log(
    hostile: Stack, client: httpx.Client, form: str
) -> None:
    written = card_forms("5105105105105100")[form]
    answers = []
    for path in (
        f"/v1/payment_methods/{written}",
        f"/{written}",
        f"/v1/forwarding/requests/{written}",
    ):
        answers.append(
            client.get(f"{hostile.url}{quote(path)}", headers=auth(hostile.accounts[1]["sk"]))
        )
    time.sleep(0.2)
    # The log first: the answers are item 10's.
    log = hostile.vault_log.read_text(encoding="utf-8", errors="replace")
    assert card_numbers_in(log) == []
    for line in log.splitlines():
        if line.startswith("{"):
            assert card_numbers_in(json.dumps(json.loads(line), ensure_ascii=False)) == []
    for response in answers:
        assert response.status_code == 404
        assert card_numbers_in(response.text) == []


# -- 10. card numbers in error answers ---------------------------------------------------------


def test_json_sent_without_a_content_type_is_not_echoed(
    hostile: Stack, client: httpx.Client
) -> None:
    # curl -d '{"card":{"number":"4242…"}}' sends it as a form.
    body = json.dumps({"type": "card", "card": {"number": VISA, "exp_month": 12}})
    response = client.post(
        f"{hostile.url}/v1/payment_methods",
        content=body,
        headers=auth(
            hostile.accounts[1]["sk"], **{"content-type": "application/x-www-form-urlencoded"}
        ),
    )
    error = assert_stripe_error(response, 400)
    assert "Content-Type: application/json" in error["message"]
    assert VISA[-8:] not in response.text


@pytest.mark.parametrize("form", ["plain", "spaces", "dots", "fullwidth"])
def test_a_card_number_as_a_parameter_name_is_not_echoed(
    hostile: Stack, client: httpx.Client, form: str
) -> None:
    written = card_forms(VISA)[form]
    for body in (
        f"{quote(written)}=x",
        f"type=card&card[{quote(written)}]=x",
        f"metadata[a]=b&{quote(written)}[x]=1",
    ):
        response = client.post(
            f"{hostile.url}/v1/payment_methods",
            content=body,
            headers=auth(
                hostile.accounts[1]["sk"], **{"content-type": "application/x-www-form-urlencoded"}
            ),
        )
        assert_stripe_error(response, 400)
        assert VISA[-8:] not in response.text
    response = client.post(
        f"{hostile.url}/v1/payment_methods",
        json={"type": "card", written: "x"},
        headers=auth(hostile.accounts[1]["sk"]),
    )
    assert_stripe_error(response, 400)


def test_an_id_in_the_path_is_echoed_only_when_it_is_shaped_like_ours(
    hostile: Stack, client: httpx.Client
) -> None:
    sk = hostile.accounts[1]["sk"]
    response = client.get(f"{hostile.url}/v1/payment_methods/{VISA}", headers=auth(sk))
    error = assert_stripe_error(response, 404)
    assert error["message"] == "No such PaymentMethod."
    response = client.get(f"{hostile.url}/v1/payment_methods/pm_NoSuchThing1", headers=auth(sk))
    assert (
        assert_stripe_error(response, 404)["message"] == "No such PaymentMethod: 'pm_NoSuchThing1'"
    )
    response = client.delete(f"{hostile.url}/v1/payment_methods/{VISA}", headers=auth(sk))
    assert_stripe_error(response, 404)
    response = client.get(f"{hostile.url}/v1/forwarding/requests/{VISA}", headers=auth(sk))
    assert_stripe_error(response, 404)
