"""Deliberately broken drivers, one or more for every MUST requirement of the driver scope: each breaks one thing
the way real implementations get it wrong, and the suite must fail it under the requirements in its `kills`.

`python -m tests.mutants.table` runs the whole suite against each of them and writes the requirement x broken-driver
table (docs/mutants.md, `tox -e mutants`); tests/meta/test_mutants.py runs a fast subset on every CI run.
A requirement whose broken driver survives is a hole in the suite: fix the suite, never the broken driver.
"""

from tests.mutants.adapters import *  # noqa: F401,F403
from tests.mutants.adapters_and_counts import *  # noqa: F401,F403
from tests.mutants.base import Mutant
from tests.mutants.config import *  # noqa: F401,F403
from tests.mutants.files import *  # noqa: F401,F403
from tests.mutants.lora_features import *  # noqa: F401,F403
from tests.mutants.merging import *  # noqa: F401,F403
from tests.mutants.methods import *  # noqa: F401,F403
from tests.mutants.models import *  # noqa: F401,F403
from tests.mutants.qlora import *  # noqa: F401,F403
from tests.mutants.round2 import *  # noqa: F401,F403



def _all_subclasses(cls) -> list:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_all_subclasses(direct))]


# name -> class, for every broken driver that claims to be caught (the others only crash, hang or misbehave)
MUTANTS = {cls.__name__: cls for cls in _all_subclasses(Mutant) if cls.kills}
