"""The server's side of dcproto."""
