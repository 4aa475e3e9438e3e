"""Trust: the server's identity (TLS), tokens with roles, who may do what, safe decoding."""
