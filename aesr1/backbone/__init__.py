"""The backbone stage, and the tiny Qwen2.5-VL testbed it builds when no real VLM is named."""
