"""Fixtures for the tests that boot a real guest."""

from collections.abc import Callable
from typing import TypeVar

import pytest

from .guest import DEFAULT_STACK, GuestImages, GuestUnavailable, build_guest, running_in_ci, static_program

T = TypeVar("T")

# The stacks every general guest test runs on: the one on these machines and the one users run today.
MAIN_STACKS = ("debian12", "debian13")


def _available(what: str, build: Callable[[], T]) -> T:
    """build()'s result; skips (fails in CI, which must run these) when `what` cannot be built here."""
    try:
        return build()
    except GuestUnavailable as exc:
        if running_in_ci():
            pytest.fail(f"CI must run the e2e tests, but {what}: {exc}")
        pytest.skip(f"{what}: {exc}")


def _images(stack: str) -> GuestImages:
    """The built guest of stack (see _available)."""
    return _available(stack, lambda: build_guest(stack))


def _program(name: str, c_source: str) -> bytes:
    """The guest program `name` built static from `c_source` (see _available)."""
    return _available(name, lambda: static_program(name, c_source))


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    """The guest of the default stack (Debian 12's QEMU 7.2 and Linux 6.1)."""
    return _images(DEFAULT_STACK)


@pytest.fixture(scope="module", params=MAIN_STACKS)
def guest_stack(request: pytest.FixtureRequest) -> str:
    """Each of MAIN_STACKS in turn, its guest built: pass it to boot_guest(stack=...)."""
    _images(request.param)
    return request.param
