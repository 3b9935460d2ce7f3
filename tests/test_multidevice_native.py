"""Data-parallel steps with the default (compiled CPU) sampler on several CPU devices.

Issue 13: a pmap step of the ST-CNN at a global batch of 256 on 2 or 8 forced
host devices used to deadlock. XLA runs the devices' programs on its intra-op
thread pool, and the kernel blocked on work it had scheduled onto that same
pool, whose threads were all inside such kernels. Each run is a subprocess
under a watchdog, so a hang fails the test in bounded time.
"""

import pytest

from stn_jax import _native
from tests.multidevice import run_with_devices

STEP = """
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from stn_jax import sampling, steps
    from stn_jax.models import DistortedMnistModel
    assert jax.local_device_count() == {devices}
    shard = 256 // {devices}
    default = jax.make_jaxpr(sampling.sample)(jnp.zeros((shard, 28, 28, 1)),
                                              jnp.zeros((shard, 28, 28, 2)))
    assert "stn_jax_bilinear_zeros" in str(default)  # the compiled sampler is the default
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (256, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 256)
    optimizer = optax.sgd(0.01, momentum=0.9)
    model = DistortedMnistModel((28, 28), backbone="cnn", transform="affine", rngs=nnx.Rngs(0))
    graphdef, state = steps.create_train_state(model, optimizer)
    step = steps.pmap_train_step(graphdef, optimizer)
    state, metrics = step(steps.replicate(state), *steps.shard_batch((images, labels)),
                          jax.random.key(0))
    assert np.isfinite(np.asarray(metrics["loss"])).all()
    assert int(state.step[0]) == 1
    print("ok")
"""


@pytest.mark.skipif(not _native.available(), reason="the compiled sampler is not built")
@pytest.mark.parametrize("devices", [2, 8])
def test_pmap_step_at_batch_256_finishes_with_the_compiled_sampler(devices):
  run_with_devices(STEP.format(devices=devices), num_devices=devices, timeout=300)
