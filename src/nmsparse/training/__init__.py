"""Training N:M sparse networks from scratch: data, models, the loop, checkpoints, DDP, the CLI.

``from nmsparse.training import TrainConfig, train`` is the programmatic entry point;
``nmsparse train`` the command line (see ``docs/training.md``).
"""

from nmsparse.training.config import TrainConfig
from nmsparse.training.loop import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
