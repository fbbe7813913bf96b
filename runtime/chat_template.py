"""Chat templates from model files, rendered in Jinja2's immutable sandbox.

A chat template comes from a model file (GGUF metadata ``tokenizer.chat_template`` or a
``tokenizer_config.json``) and is therefore untrusted input: it must not reach Python objects that can run code.
Templates are rendered the way Hugging Face's libraries render them: ``ImmutableSandboxedEnvironment`` with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, and the helpers real templates call
(``raise_exception``, ``strftime_now``, a ``tojson`` filter that keeps non-ASCII text). The rendered text is
bounded so that a template cannot exhaust memory.
"""

from __future__ import annotations

import datetime
import json
from functools import lru_cache
from typing import Any

from xpuc.runtime.errors import XpucError

#: Upper bound on the rendered prompt (characters); real templates produce a few hundred.
MAX_RENDERED_CHARS = 1 << 20


class ChatTemplateError(XpucError):
    """A template that does not parse, raises, or tries to leave the sandbox."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def render_chat_template(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Render ``template`` for ``messages`` in the sandbox.

    Parameters
    ----------
    template : str
        The Jinja2 source, as found in the model file.
    messages : list of dict
        The conversation, ``{"role": ..., "content": ...}`` per turn.
    add_generation_prompt : bool
        Ask the template to end with the assistant's turn header.
    **variables
        Further template variables (``bos_token``, ``eos_token``, ...).

    Returns
    -------
    str
        The prompt text.

    Raises
    ------
    ChatTemplateError
        The template does not parse, raises, reaches an attribute the sandbox forbids, or renders more than
        ``MAX_RENDERED_CHARS`` characters.
    """
    import jinja2
    from jinja2.sandbox import SecurityError

    try:
        compiled = _environment().from_string(template)
        parts, size = [], 0
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                raise ChatTemplateError(f"chat template renders more than {MAX_RENDERED_CHARS} characters")
            parts.append(piece)
        return "".join(parts)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template refused by the sandbox: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template cannot be rendered: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
