"""The creator's side of dcproto."""
