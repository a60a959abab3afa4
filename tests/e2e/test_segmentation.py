"""The zones apart, proved on a network (PCI DSS 11.4.5, segmentation testing).

Each zone runs in a network namespace of its own, joined to a firewall namespace by a
veth pair: the primary zone (where the shop would run), the card zone (the vault), the
key zone (keyd), an admin bastion and the outside (the acquirer, the only allowlisted
destination). The firewall routes between them under deploy/nftables/zones.nft, the
file an operator installs, loaded as it ships. The real services run in their zones
(keyd, the vault, the acquirer), and from inside each zone the test proves what it can
and cannot reach:

* the primary zone reaches the vault's public API and nothing else (not keyd, not the
  admin API, not the database port, not the acquirer);
* the card zone reaches keyd and the allowlisted destination only;
* the key zone reaches nothing;
* the admin bastion reaches the vault's admin API and keyd.

And across the firewall, end to end: a card tokenized from the primary zone, its data
key fetched by the vault from keyd, the card forwarded to the acquirer.

Then it shows that it would notice: with the vault → keyd rule deleted, or with the
default changed from deny to accept, the same checks report exactly what changed.

Needs root, iproute2 and nftables (the test command installs nftables when it runs as
root); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import ROOT, Pki

RULES = ROOT / "deploy" / "nftables" / "zones.nft"
ZONES = {"shop": 1, "vault": 2, "keyd": 3, "outside": 4, "admin": 5}
NAMES = {"vault": "vault.zone.test", "keyd": "keyd.zone.test", "outside": "acquirer.zone.test"}
PORTS = {"public": 8443, "admin": 8447, "keyd": 8444, "database": 5432, "https": 443}


def address(zone: str) -> str:
    return f"10.77.{ZONES[zone]}.2"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables); CI runs as root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2, nftables; scripts/test installs them as root)"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=check)


#: Runs inside a zone: exit 0 if a TCP connection to HOST:PORT opens within the timeout.
PROBE = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()\n"
    "except OSError:\n"
    "    sys.exit(1)\n"
)


@dataclass
class Net:
    """The namespaces: ``ns[zone]`` and the firewall ``fw``."""

    ns: dict[str, str]
    fw: str

    def exec(self, zone: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[zone], *args]

    def reaches(self, zone: str, target: str, port: int, timeout: float = 0.7) -> bool:
        host = address(target)
        proc = subprocess.run(
            self.exec(zone, sys.executable, "-c", PROBE, host, str(port), str(timeout)),
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        return proc.returncode == 0

    def load_rules(self) -> None:
        defines = {
            "PRIMARY_NET": "10.77.1.0/24",
            "VAULT": address("vault"),
            "KEYD": address("keyd"),
            "ADMIN_NET": "10.77.5.0/24",
            "DESTINATIONS": address("outside"),
            "VAULT_PUBLIC_PORT": str(PORTS["public"]),
            "VAULT_ADMIN_PORT": str(PORTS["admin"]),
            "KEYD_PORT": str(PORTS["keyd"]),
        }
        args = [a for k, v in defines.items() for a in ("-D", f"{k}={v}")]
        run("ip", "netns", "exec", self.fw, "nft", *args, "-f", str(RULES))

    def nft(self, *args: str) -> str:
        return run("ip", "netns", "exec", self.fw, "nft", *args).stdout


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    tag = secrets.token_hex(2)
    ns = {zone: f"cv{tag}-{zone}" for zone in ZONES}
    fw = f"cv{tag}-fw"
    made: list[str] = []
    try:
        for name in (fw, *ns.values()):
            run("ip", "netns", "add", name)
            made.append(name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "netns", "exec", fw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for zone, n in ZONES.items():
            outer, inner = f"f{tag}{n}", f"z{tag}{n}"
            run("ip", "link", "add", outer, "netns", fw, "type", "veth", "peer", inner,
                "netns", ns[zone])  # fmt: skip
            run("ip", "-n", fw, "addr", "add", f"10.77.{n}.1/24", "dev", outer)
            run("ip", "-n", fw, "link", "set", outer, "up")
            run("ip", "-n", ns[zone], "addr", "add", f"{address(zone)}/24", "dev", inner)
            run("ip", "-n", ns[zone], "link", "set", inner, "up")
            run("ip", "-n", ns[zone], "route", "add", "default", "via", f"10.77.{n}.1")
            # The zone's names, as its resolver would answer them (ip netns exec
            # mounts /etc/netns/<name>/hosts over /etc/hosts).
            etc = Path("/etc/netns") / ns[zone]
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(
                "127.0.0.1 localhost\n"
                + "".join(f"{address(z)} {name}\n" for z, name in NAMES.items())
            )
        net = Net(ns, fw)
        net.load_rules()
        yield net
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        for name in ns.values():
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


@dataclass
class Services:
    sk: str
    procs: list[subprocess.Popen[bytes]]


def _wait(net: Net, zone: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{zone} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if net.reaches(zone, zone, port, timeout=0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{zone} did not listen on {port}: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def services(net: Net, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    d = tmp_path_factory.mktemp("zones")
    issued = {
        "keyd": pki.ca.issue("zone-keyd", dns=[NAMES["keyd"]], out_dir=d),
        "vault": pki.ca.issue("zone-vault", dns=[NAMES["vault"]], client_identity="vault", out_dir=d),
        "outside": pki.ca.issue("zone-acquirer", dns=[NAMES["outside"]], out_dir=d),
    }  # fmt: skip
    keyd_conf, vault_conf = d / "keyd.toml", d / "vault.toml"
    keyd_conf.write_text(
        'profile = "development"\n[server]\nhost = "0.0.0.0"\n'
        f'port = {PORTS["keyd"]}\ncert_file = "{issued["keyd"].cert_path}"\n'
        f'key_file = "{issued["keyd"].key_path}"\nclient_ca_file = "{pki.ca_file}"\n'
        f'[store]\nurl = "sqlite:///{d / "keyd.db"}"\n[audit]\ndirectory = "{d / "keyd-audit"}"\n'
        f'[seal]\ntype = "dev"\ndev_key_file = "{d / "root.key"}"\n'
    )
    allowlist = d / "allowlist.toml"
    allowlist.write_text(
        f'[[destination]]\nname = "acquirer"\nurl = "https://{NAMES["outside"]}/v1/authorizations"\n'
        'methods = ["POST"]\nreplacements = ["card_number", "card_expiry", "card_cvc"]\naccounts = ["*"]\n'
        f'ca_file = "{pki.ca_file}"\n[destination.placements]\n'
        'card_number = { json = "/card/number" }\n'
        'card_expiry = { json_month = "/card/exp_month", json_year = "/card/exp_year" }\n'
        'card_cvc = { json = "/card/cvc" }\n'
    )
    vault = issued["vault"]
    vault_conf.write_text(
        'profile = "development"\n[server]\nhost = "0.0.0.0"\n'
        f'port = {PORTS["public"]}\ncert_file = "{vault.cert_path}"\nkey_file = "{vault.key_path}"\n'
        f'[admin]\nhost = "0.0.0.0"\nport = {PORTS["admin"]}\nclient_ca_file = "{pki.ca_file}"\n'
        f'[store]\nurl = "sqlite:///{d / "vault.db"}"\n[audit]\ndirectory = "{d / "audit"}"\n'
        f'[keyservice]\nurl = "https://{NAMES["keyd"]}:{PORTS["keyd"]}"\nca_file = "{pki.ca_file}"\n'
        f'cert_file = "{vault.cert_path}"\nkey_file = "{vault.key_path}"\n'
        f'[forwarding]\nallowlist_file = "{allowlist}"\n'
    )
    cv = [sys.executable, "-m", "cardvault"]
    run(*cv, "keyservice", "init", "--config", str(keyd_conf))
    made = run(*cv, "accounts", "create", "--config", str(vault_conf), "--name", "zones").stdout
    sk = next(line.split()[-1] for line in made.splitlines() if line.startswith("secret (test)"))
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for zone, command, port in (
            ("keyd", [*cv, "keyservice", "serve", "--config", str(keyd_conf)], PORTS["keyd"]),
            ("outside", [sys.executable, "-m", "examples.acquirer", "--host", "0.0.0.0",  # noqa: S104
                         "--port", "443", "--cert", str(issued["outside"].cert_path),
                         "--key", str(issued["outside"].key_path), "--state",
                         str(d / "acquirer")], PORTS["https"]),
            ("vault", [*cv, "vault", "serve", "--config", str(vault_conf)], PORTS["public"]),
        ):  # fmt: skip
            log_path = d / f"{zone}.log"
            log = log_path.open("wb")
            logs.append(log)
            proc = subprocess.Popen(net.exec(zone, *command), cwd=ROOT, stdout=log, stderr=log)
            procs.append(proc)
            _wait(net, zone, port, proc, log_path)
        # A stand-in for the vault's database port, in the card zone: what the rules
        # must keep every other zone from.
        db = subprocess.Popen(
            net.exec("vault", sys.executable, "-c",
                     "import socket, time\n"
                     "s = socket.create_server(('0.0.0.0', 5432)); s.listen()\n"
                     "while True: s.accept()[0].close()\n"),
        )  # fmt: skip
        procs.append(db)
        _wait(net, "vault", PORTS["database"], db, d / "vault.log")
        yield Services(sk, procs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


#: (from, to, port, reachable): what the rules allow and what they must not.
EXPECTED = [
    ("shop", "vault", PORTS["public"], True),
    ("shop", "vault", PORTS["admin"], False),
    ("shop", "vault", PORTS["database"], False),
    ("shop", "keyd", PORTS["keyd"], False),
    ("shop", "outside", PORTS["https"], False),
    ("vault", "keyd", PORTS["keyd"], True),
    ("vault", "outside", PORTS["https"], True),
    ("vault", "shop", PORTS["https"], False),
    ("vault", "admin", PORTS["https"], False),
    ("keyd", "vault", PORTS["public"], False),
    ("keyd", "vault", PORTS["admin"], False),
    ("keyd", "vault", PORTS["database"], False),
    ("keyd", "outside", PORTS["https"], False),
    ("keyd", "shop", PORTS["https"], False),
    ("outside", "vault", PORTS["admin"], False),
    ("outside", "keyd", PORTS["keyd"], False),
    ("admin", "vault", PORTS["admin"], True),
    ("admin", "keyd", PORTS["keyd"], True),
    ("admin", "vault", PORTS["database"], False),
]


def violations(net: Net) -> list[str]:
    """Every path of EXPECTED that does not behave as the rules say, in words."""
    found = []
    for source, target, port, allowed in EXPECTED:
        if net.reaches(source, target, port) != allowed:
            verb = "cannot reach" if allowed else "reaches"
            found.append(f"{source} {verb} {target}:{port}")
    return found


def test_each_zone_reaches_only_what_the_rules_allow(net: Net, services: Services) -> None:
    assert violations(net) == []


def test_a_card_crosses_the_firewall_only_on_the_allowed_paths(
    net: Net, services: Services, pki: Pki
) -> None:
    """From the primary zone: tokenize, then forward; the vault fetches its data key from
    keyd and sends the card to the acquirer, each across the firewall."""
    script = (
        "import json, sys, httpx\n"
        "from cardvault.transport.tls import client_context\n"
        "url, sk, ca = sys.argv[1:4]\n"
        "with httpx.Client(verify=client_context(ca), timeout=30, trust_env=False) as c:\n"
        "    h = {'authorization': 'Bearer ' + sk}\n"
        "    pm = c.post(url + '/v1/payment_methods', headers=h, data={'type': 'card',\n"
        "        'card[number]': '4242424242424242', 'card[exp_month]': '12',\n"
        "        'card[exp_year]': '2034', 'card[cvc]': '314'}).json()\n"
        "    fwd = c.post(url + '/v1/forwarding/requests', headers=h, data={\n"
        "        'payment_method': pm['id'], 'url': 'https://acquirer.zone.test/v1/authorizations',\n"
        "        'replacements[0]': 'card_number', 'replacements[1]': 'card_expiry',\n"
        "        'replacements[2]': 'card_cvc',\n"
        "        'request[headers][0][name]': 'Content-Type',\n"
        "        'request[headers][0][value]': 'application/json',\n"
        "        'request[body]': json.dumps({'amount': 100, 'currency': 'usd', 'card': {'number': '',\n"
        "            'exp_month': '', 'exp_year': ''}})}).json()\n"
        "    print(json.dumps({'pm': pm, 'forward': fwd}))\n"
    )
    proc = subprocess.run(
        net.exec("shop", sys.executable, "-c", script,
                 f"https://{NAMES['vault']}:{PORTS['public']}", services.sk, str(pki.ca_file)),
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["pm"]["card"]["last4"] == "4242"
    answer = result["forward"]["response_details"]
    assert answer["status"] == 200, answer
    assert '"approved"' in answer["body"]  # the acquirer had the real card, CVC and all


def test_the_checks_catch_a_rule_removed_or_the_default_opened(
    net: Net, services: Services
) -> None:
    """The same checks, after the firewall is changed: they name what changed. The rules
    are loaded again afterwards."""
    try:
        listing = net.nft("-a", "list", "chain", "inet", "cardvault_zones", "forward")
        handle = next(
            line.rsplit("# handle ", 1)[1].strip()
            for line in listing.splitlines()
            if f"ip daddr {address('keyd')}" in line and f"ip saddr {address('vault')}" in line
        )
        net.nft("delete", "rule", "inet", "cardvault_zones", "forward", "handle", handle)
        assert violations(net) == [f"vault cannot reach keyd:{PORTS['keyd']}"]

        net.load_rules()
        net.nft("add", "chain", "inet", "cardvault_zones", "forward", "{ policy accept; }")
        opened = violations(net)
        assert f"shop reaches keyd:{PORTS['keyd']}" in opened
        assert f"shop reaches vault:{PORTS['admin']}" in opened
        assert f"keyd reaches outside:{PORTS['https']}" in opened
    finally:
        net.load_rules()
    assert violations(net) == []


def test_the_probe_itself_sees_an_open_port(net: Net, services: Services) -> None:
    """A check that cannot fail proves nothing: the probe, inside a zone, sees the ports
    its own zone serves (so a 'cannot reach' above is the firewall, not the probe)."""
    assert net.reaches("vault", "vault", PORTS["public"])
    assert net.reaches("keyd", "keyd", PORTS["keyd"])
    assert not net.reaches("vault", "vault", 1)
