"""cardvault.keyservice."""
