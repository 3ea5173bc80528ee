"""`tats run` (being written)."""


def run() -> None:
    """Chain tracks, features and training, resuming wherever a stage stopped."""
