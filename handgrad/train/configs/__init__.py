"""The shipped training configs (TOML), package data read by handgrad.train.config."""
