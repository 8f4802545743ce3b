"""The policy: backbone, cold-start SFT, generation."""
