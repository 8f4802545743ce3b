"""RAPO reinforcement learning: rewards and GRPO training."""
