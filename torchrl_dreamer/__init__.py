"""torchrl_dreamer: DreamerV3 and PPO baselines as TorchRL modules, losses and recipes."""
__version__ = "0.1.0"
