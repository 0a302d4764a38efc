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


def test_weights_unpacked_compute_the_same_losses(llama_lm_bundle, tmp_path):
    import numpy as np

    from edgeft.runtime import Bundle
    from edgeft.runtime.bundle import session_options

    path = tmp_path / "unpacked.toml"
    path.write_text('name = "unpacked"\nthreads = 1\nprepack_weights = false\n')
    unpacked = load_profile(str(path))
    assert session_options(unpacked).get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(RuntimeError):  # the default leaves ONNX Runtime's packing on: the key is not set
        session_options(load_profile(None)).get_session_config_entry("session.disable_prepacking")
    packed_b, unpacked_b = Bundle(llama_lm_bundle, load_profile(None)), Bundle(llama_lm_bundle, unpacked)
    enc = packed_b.encode(["the acting was great", "i hated the boring music and the plot"])
    theta = packed_b.layout.initial(0) + 0.01
    a = packed_b.run(packed_b.feeds(enc, np.arange(2)), theta, ["logits"])[0]
    b = unpacked_b.run(unpacked_b.feeds(enc, np.arange(2)), theta, ["logits"])[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_prepack_weights_must_be_a_boolean(tmp_path):
    from edgeft.errors import EdgeftError

    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\nprepack_weights = "no"\n')
    with pytest.raises(EdgeftError, match="prepack_weights must be true or false"):
        load_profile(str(path))
