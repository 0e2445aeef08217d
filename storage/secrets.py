"""Secrets stay out of what the harness writes: a redacted copy of any config-like value.

Credentials come from the environment; but a free-form mapping a user passes through (DeepSpeed
extras, tracker settings) may hold an API key, so every copy written to the run directory goes
through `redacted`.
"""

from __future__ import annotations

from typing import Any

# Keys whose values are hidden: DeepSpeed's monitor sections (comet, wandb) take API keys, S3
# settings take access keys and tokens.
SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def redacted(config: Any) -> Any:
    """A copy of a config with the values of secret-looking keys replaced by '<redacted>'."""
    if isinstance(config, dict):
        return {k: "<redacted>" if any(w in str(k).lower() for w in SECRET_WORDS)
                else redacted(v) for k, v in config.items()}
    if isinstance(config, list):
        return [redacted(v) for v in config]
    return config
