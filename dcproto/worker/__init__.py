"""The worker's side of dcproto."""
