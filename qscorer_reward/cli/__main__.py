"""``python -m qscorer_reward.cli`` (the form ``accelerate launch -m`` takes) is ``qscorer``."""

import sys

from qscorer_reward.cli import main

sys.exit(main())
