"""Transport security shared by every listener and client: TLS contexts, certificates,
HSTS and security headers, the HTTP-to-HTTPS redirect, security.txt, and the verified
client identity of mutual TLS."""
