"""lm-eval task configs (YAML) and the helpers they name; see README.md."""
