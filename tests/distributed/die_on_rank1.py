"""``torchrun`` entry for the fault test: the routing PPO recipe, whose rank 1 process dies (SIGKILL)
in its second update, as a crashed or OOM-killed worker would."""
import os
import signal
import sys

import recipes.ppo_routing as recipe

_update = recipe.update_step


def dying_update(*args, iteration, **kwargs):
    if os.environ.get("RANK") == "1" and iteration == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return _update(*args, iteration=iteration, **kwargs)


recipe.update_step = dying_update

if __name__ == "__main__":
    sys.argv[0] = "recipes.ppo_routing"
    recipe.cli()
