"""Fixtures of the comparison tests. The world itself lives in compare_world.py: a module with a unique name,
because every test folder's conftest.py is imported as `conftest` and a later one replaces an earlier one."""

from compare_world import toy_world  # noqa: F401  (re-exported as a fixture)
