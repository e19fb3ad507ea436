import tracesft.known_warnings  # noqa: F401  (before any library that emits them is imported)
