"""The policy: its prompt and datasets, training (SFT, and what RL shares), cold-start SFT, generation."""
