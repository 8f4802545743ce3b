"""AesCoT: score-masked critique distillation and triple filtering."""
