"""The test suite (a regular package, so that `tests.helpers` is ours even where another distribution installs a
top-level `tests` package, as torchstain 1.4.1 does)."""
