"""Fixtures for the tests that boot a real guest."""

import pytest

from .guest import DEFAULT_STACK, GuestImages, GuestUnavailable, build_guest, running_in_ci

# The stacks every general guest test runs on: the one on these machines and the one users run today.
MAIN_STACKS = ("debian12", "debian13")


def _images(stack: str) -> GuestImages:
    """The built guest of stack; skips (fails in CI, which must run these) when it cannot be built here."""
    try:
        return build_guest(stack)
    except GuestUnavailable as exc:
        if running_in_ci():
            pytest.fail(f"CI must run the e2e tests on {stack}, but {exc}")
        pytest.skip(f"{stack}: {exc}")


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    """The guest of the default stack (Debian 12's QEMU 7.2 and Linux 6.1)."""
    return _images(DEFAULT_STACK)


@pytest.fixture(scope="module", params=MAIN_STACKS)
def guest_stack(request: pytest.FixtureRequest) -> str:
    """Each of MAIN_STACKS in turn, its guest built: pass it to boot_guest(stack=...)."""
    _images(request.param)
    return request.param
