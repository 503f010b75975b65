"""Hypothesis settings per backend: many examples on the simulator, few on Docker hosts."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings
from scenario import Bed

# The simulator starts a cluster in a few milliseconds: many examples, no
# deadline because a loaded 2-core machine makes per-example times jumpy.
SIM_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# A Docker example takes seconds, so each property runs 5 of them without
# shrinking, because each shrink step would start clusters again. Without an
# example database, examples saved by simulator runs are not replayed here.
DOCKER_SETTINGS = settings(
    max_examples=5,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def settings_for(bed: Bed) -> settings:
    return DOCKER_SETTINGS if bed.name == "docker" else SIM_SETTINGS
