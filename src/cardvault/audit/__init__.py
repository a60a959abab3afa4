"""cardvault.audit."""
