"""Fixtures for the tests that boot a real guest."""

import pytest

from .guest import GuestImages, GuestUnavailable, build_guest, running_in_ci


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    """The built guest; skips (fails in CI, which must run these) when it cannot be built here."""
    try:
        return build_guest()
    except GuestUnavailable as exc:
        if running_in_ci():
            pytest.fail(f"CI must run the e2e tests, but {exc}")
        pytest.skip(str(exc))
