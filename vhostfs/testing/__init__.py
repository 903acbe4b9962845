"""Test tooling: a vhost-user front end written in Python that plays the VMM and the guest driver."""
