"""The key service: the key zone's process.

It holds the root key (only in memory, rebuilt from custodian shares or a development
seal) and the key-encrypting keys, sealed under it in its own store, and never lets
either out. Over mutual TLS, to the identities it was told to trust, it issues data
keys (the plaintext and the wrapped form) to the vault, unwraps wrapped data keys,
derives per-account keys, and lets an administrator unseal, seal, rotate and rewrap.

- ``app.py``: wiring: settings → the store and the service → its one listener → run;
  and ``initialize_key_service``, the command line's door to ``cardvault keyservice
  init``.
- ``http.py``: every route, one handler each; the caller's certificate identity is
  checked before anything else, and every refusal is audited.
- ``service.py``: :class:`~cardvault.keyservice.service.KeyService`: the seal, the
  keyring and the operations. ``settings.py``: its settings.
- ``seals.py``: the root key behind each seal (in memory, or inside a PKCS#11 token)
  and the wrapped Shamir form; ``ceremony.py``: ``reseal`` and ``rekey`` on a stopped
  key service.

What it may import: :mod:`cardvault.crypto` (the safe layer), :mod:`cardvault.storage`
(its own store, the ``KeyStore`` protocol; never the vault's database), the audit log,
the transport, :mod:`cardvault.cards` for the card-number finder only. Never
:mod:`cardvault.vault`: the vault is another zone (``tests/unit/test_import_boundaries.py``).
"""
