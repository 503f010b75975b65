"""Integration tests against SSH hosts in Docker (a package, so module names may repeat those in tests/unit)."""
