"""Chat templates: a tokenizer's `chat_template`, rendered as transformers' apply_chat_template
renders it. One place for `crystal serve` (a request's messages) and `crystal prepare --format
chat` (a data set's conversations).

The template is chat_template.jinja beside tokenizer_config.json, else the config's
`chat_template` (a text, or a list of {name, template} of which "default" is taken). It is
compiled as transformers compiles it (`_compile_jinja_template`): a sandboxed jinja2 environment
with trim_blocks and lstrip_blocks and the loopcontrols extension, `raise_exception`, `tojson`
and `strftime_now`; rendered with `messages`, `add_generation_prompt` and the special tokens
(bos_token, eos_token, unk_token, pad_token) as the config names them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from crystal.atomic import check_regular
from crystal.errors import CrystalError
from crystal.jsonio import read_json

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TemplateRefused(CrystalError):
    """The template raised on these messages (raise_exception, or its own error)."""


def read_chat_template(where: Path) -> tuple[str | None, dict]:
    """The chat template of a model or tokenizer directory and its tokenizer_config.json (or {})."""
    config = {}
    cfg_file = where / "tokenizer_config.json"
    if cfg_file.is_file():
        check_regular(cfg_file)
        try:
            config = read_json(cfg_file)
        except OSError as e:
            raise CrystalError(f"cannot read {cfg_file}: {e.strerror or e}") from None
        if not isinstance(config, dict):
            raise CrystalError(f"{cfg_file} is not a JSON object")
    jinja_file = where / "chat_template.jinja"
    if jinja_file.is_file():
        check_regular(jinja_file)
        try:
            return jinja_file.read_text(encoding="utf-8"), config
        except (OSError, UnicodeDecodeError) as e:
            raise CrystalError(f"cannot read {jinja_file}: {e}") from None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template if isinstance(template, str) and template else None), config


def special_token(config: dict, name: str) -> str | None:
    """tokenizer_config.json's bos_token, eos_token...: a text or an AddedToken-like {content}."""
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(config: dict) -> dict[str, str]:
    """The special tokens a template sees: those of SPECIAL_TOKENS the config names."""
    return {k: v for k in SPECIAL_TOKENS if (v := special_token(config, k)) is not None}


class ChatTemplate:
    """A chat template compiled as transformers compiles it (its `_compile_jinja_template`)."""

    def __init__(self, source: str, special: dict[str, str]):
        try:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise CrystalError(f"chat templates need jinja2 (pip install 'crystal[serve]'): {e}") from None

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.TemplateError = TemplateError
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise CrystalError(f"the tokenizer's chat_template does not compile: {e}") from None
        self.special = special

    @classmethod
    def of(cls, where: Path) -> "ChatTemplate | None":
        """The template of a directory (read_chat_template), or None where it has none."""
        source, config = read_chat_template(where)
        return None if source is None else cls(source, special_tokens(config))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The messages as text; TemplateRefused where the template raises."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special)
        except self.TemplateError as e:
            raise TemplateRefused(f"the chat template refused these messages: {e}") from None
        except Exception as e:  # a template's own error (an undefined attribute, a type)
            raise TemplateRefused(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
