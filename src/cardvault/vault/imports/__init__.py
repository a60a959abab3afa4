"""Bulk import of cards (docs/migration.md): the vault's OpenPGP import key, uploads
of encrypted files, and runs that check a file whole and then import it in batches.

* :mod:`.reader`: rows out of a file's plaintext (JSON lines, CSV), every size bounded;
  pure, no I/O.
* :mod:`.pgp`: the import key and streamed decryption (python-gnupg over ``gpg``).
* :mod:`.service`: :class:`~.service.Imports`, handed the store, the payment methods
  (whose checks and sealing every row goes through), the data keys and the audit
  recorder.
* :mod:`.batches`: the import pass's batches, each prepared and then stored (its audit
  record, its transaction), one stored while the next is prepared.

It may import the storage layer's interfaces, the vault's services and the crypto
layer; never the key service (the data keys come through the vault's client).
"""

from cardvault.errors import ImportRefused
from cardvault.vault.imports.service import Imports

__all__ = ["ImportRefused", "Imports"]
