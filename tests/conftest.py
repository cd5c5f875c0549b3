import os

import pytest

# Tests run on the CPU whatever the machine has; a persistent cache keeps reruns fast.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(0)
