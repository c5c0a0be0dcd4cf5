"""Which config values are secrets, and their redacted form (``llmuxd --check-config``).

The rule (docs/configuration.md, "Secrets"):

* every ``proxy.api_keys`` entry (those read from ``api_keys_file`` included);
* a model ``env`` value whose NAME says secret: it contains TOKEN, SECRET, PASSW,
  KEY, CREDENTIAL, AUTH, COOKIE or PRIVATE (any case);
* a model ``env`` value that LOOKS like a token whatever its name: a known token
  prefix (``hf_``, ``sk-``, ``ghp_``, ``github_pat_``, ``glpat-``, ``xox?-``, ``AKIA``,
  a JWT's ``eyJ``), or one word of 24+ characters mixing letters and digits with no
  ``/`` (so paths, URLs and device lists stay visible).

Why a pattern rule rather than an explicit list: operators put tokens under names
we cannot know; printing a harmless value as ``<redacted>`` costs little, printing a
token into a ticket or a CI log costs a rotation.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH|COOKIE|PRIVATE", re.I)
_TOKEN_PREFIX = re.compile(r"(hf_|sk-|sk_|ghp_|gho_|ghs_|github_pat_|glpat-|xox[abpr]-|AKIA|eyJ)")
_LONG_WORD = re.compile(r"[A-Za-z0-9_\-.+=]{24,}")


def is_secret_env(name: str, value: str) -> bool:
    """True when an ``env`` entry must not be printed."""
    if _SECRET_NAME.search(name):
        return True
    if _TOKEN_PREFIX.match(value):
        return True
    return bool(_LONG_WORD.fullmatch(value) and re.search(r"[A-Za-z]", value)
                and re.search(r"[0-9]", value))


def redact_config(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``Config.to_dict()`` output with the secrets replaced by ``<redacted>``."""
    out = dict(data)
    proxy = dict(out.get("proxy") or {})
    if proxy.get("api_keys"):
        proxy["api_keys"] = [REDACTED for _ in proxy["api_keys"]]
    out["proxy"] = proxy
    models = {}
    for name, model in (out.get("models") or {}).items():
        model = dict(model)
        env = model.get("env") or {}
        model["env"] = {k: REDACTED if is_secret_env(k, v) else v for k, v in env.items()}
        models[name] = model
    out["models"] = models
    return out
