"""Shipped device profiles parse and say something a session can use."""

import pytest

from edgeft.runtime.devices import available_profiles, load_profile


def test_the_briefed_devices_are_shipped():
    assert {"laptop-cpu", "raspberry-pi-5-4gb", "android-phone", "cuda-4gb"} <= set(available_profiles())


@pytest.mark.parametrize("name", available_profiles())
def test_profile_loads(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.providers and profile.providers[-1] == "CPUExecutionProvider"
    assert profile.batch_size >= 1 and profile.max_length >= 32 and profile.memory_budget_mb > 0
