"""Chat templates from model files are rendered in a sandbox: known escape payloads fail, real templates work."""

from __future__ import annotations

import pytest

from xpuc.runtime.chat_template import MAX_RENDERED_CHARS, ChatTemplateError, render_chat_template

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face'"
           " + '<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Template shapes seen in real tokenizer_config.json files: namespace(), loop controls, tojson, raise_exception,
# strftime_now, whitespace control with trim_blocks / lstrip_blocks.
REALISTIC = """{%- set ns = namespace(sys='') -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{%- set ns.sys = m['content'] -%}{%- continue -%}{%- endif -%}
  {%- if m['role'] not in ['user', 'assistant'] -%}{{ raise_exception('bad role ' + m['role']) }}{%- endif -%}
[{{ m['role'] }}] {{ m['content'] | tojson }}
{% endfor -%}
{%- if ns.sys %}(system: {{ ns.sys }}){% endif -%}
{%- if add_generation_prompt %}[assistant]{% endif -%}
"""

ESCAPES = [
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch MARKER') }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ joiner.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ namespace.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch MARKER') }}",
    "{{ strftime_now.__globals__['datetime'].sys.modules['os'].system('touch MARKER') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c(['touch', 'MARKER']) }}{% endif %}{% endfor %}",
    "{{ messages.append({'role': 'x'}) }}",  # the immutable sandbox: no mutation of inputs
    "{{ messages[0].update({'content': 'x'}) }}",
    "{{ (messages|first).__class__.__init__.__globals__ }}",
    "{{ ''.format.__self__.__class__.__mro__ }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
]


def test_real_template_renders_as_huggingface_does():
    out = render_chat_template(SMOLLM2, [{"role": "user", "content": "hi"}])
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_template_helpers_and_controls():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    out = render_chat_template(REALISTIC, msgs)
    assert out == '[user] "héllo"\n(system: be brief)[assistant]'
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        render_chat_template(REALISTIC, [{"role": "tool", "content": "x"}])
    year = render_chat_template("{{ strftime_now('%Y') }}", [])
    assert year.isdigit() and len(year) == 4


@pytest.mark.parametrize("payload", ESCAPES)
def test_escape_payloads_are_refused(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatTemplateError):
        render_chat_template(payload, [{"role": "user", "content": "hi"}])
    assert not (tmp_path / "MARKER").exists()


def test_broken_and_huge_templates_are_one_error():
    with pytest.raises(ChatTemplateError, match="cannot be rendered"):
        render_chat_template("{% for %}", [])
    with pytest.raises(ChatTemplateError, match="more than"):
        render_chat_template("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", [])
    assert MAX_RENDERED_CHARS >= 1 << 16
