"""cardvault.vault."""
