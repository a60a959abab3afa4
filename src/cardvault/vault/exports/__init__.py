"""Card export (docs/migration.md, "Exporting"): every card of an account, encrypted
with OpenPGP to a recipient of a static allowlist, after k-of-n custodian approval.

* :mod:`.recipients`: the allowlist file, each recipient's key checked at start-up.
* :mod:`.approval`: the export-approval ceremony's check, and the approvals held in
  memory with an expiry.
* :mod:`.service`: :class:`~.service.Exports`, handed the store, the data keys, the
  audit recorder, the recipients and the approvals.

It may import the storage layer's interfaces, the vault's services and the crypto
layer; never the key service.
"""

from cardvault.vault.exports.service import Exports

__all__ = ["Exports"]
