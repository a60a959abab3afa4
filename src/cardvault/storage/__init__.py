"""cardvault.storage."""
